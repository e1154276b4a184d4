"""The pretrain stage end to end on tiny settings: artifact, export, resume, signals, NaN, saliency checks."""

import json
import math
import os
import signal
import sys
from types import SimpleNamespace

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from relicv2_cli import artifacts
from relicv2_cli.errors import RelicError
from relicv2_cli.stages import pretrain
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain

TINY = dict(spec="synthetic", limit_train=64, limit_test=32, arch="resnet18", width=0.25, proj_hidden=64,
            proj_dim=32, batch_size=16, epochs=2.0, warmup_epochs=0.5, log_every=1, eval_every=0)


def records(art):
    return [json.loads(line) for line in (art.path / "metrics.jsonl").read_text().splitlines()]


def test_relicv2_artifact_has_state_metrics_and_backbones(tmp_path):
    art = run_pretrain(PretrainConfig(**TINY, max_steps=3), workdir=tmp_path, quiet=True)
    assert art.kind == "pretrain" and art.config["method"] == "relicv2"
    for name in ("checkpoint.pt", "metrics.jsonl", "backbone.safetensors", "backbone.pt"):
        assert (art.path / name).exists()
    rows = records(art)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    first = rows[0]
    for key in ("loss", "contrastive", "kl", "lr", "ema_rate", "embedding_std", "images_per_s",
                "probe_train_top1"):
        assert key in first
    assert first["loss"] == pytest.approx(first["contrastive"] + first["kl"], rel=1e-5)  # alpha = beta = 1
    assert "knn_top1" in rows[-1] and "knn_top1" in art.metrics
    state = torch.load(art.path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and {"online", "target", "optimizer", "probe"} <= set(state)
    assert artifacts.verify_artifact(art.path) == []


def test_imagenet_stem_width_1_backbone_loads_into_torchvision(tmp_path):
    # fp32: torch's bf16 CPU convolution backward returns NaN and 1e33 in layer4.0.conv1's weight gradient
    # at this size (16 px, 1x1 maps); the finite-weights check stops such a run (issue 19).
    cfg = PretrainConfig(**{**TINY, "width": 1.0, "limit_train": 16, "batch_size": 8}, n_negatives=4,
                         stem="imagenet", max_steps=1, precision="fp32")
    art = run_pretrain(cfg, workdir=tmp_path, quiet=True)
    exported = (load_file(art.path / "backbone.safetensors"),
                torch.load(art.path / "backbone.pt", weights_only=True))
    for state in exported:
        result = torchvision.models.resnet18().load_state_dict(state, strict=False)
        assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []


def test_byol_and_supervised_train(tmp_path):
    byol = run_pretrain(PretrainConfig(**TINY, method="byol", max_steps=2), workdir=tmp_path, quiet=True)
    assert [r["step"] for r in records(byol) if "loss" in r] == [1, 2] and "kl" not in records(byol)[0]
    sup = run_pretrain(PretrainConfig(**TINY, method="supervised", max_steps=2), workdir=tmp_path, quiet=True)
    assert records(sup)[0]["loss"] == pytest.approx(2.3, abs=0.6)  # cross-entropy near log(10) at init


def _step_inputs(method="relicv2", small_crops=2, **overrides):
    """A float64 online/target pair and one batch of views, to check `_loss` against a by-hand loop."""
    from relicv2_cli.augment import make_views
    from relicv2_cli.models import build_network, make_target

    cfg = PretrainConfig(**{**TINY, "method": method, "small_crops": small_crops, "precision": "fp64",
                            "large_size": 16, "small_size": 8, **overrides})
    torch.manual_seed(0)
    online = build_network("resnet18", 0.25, "cifar", 32, 16, zero_init_residual=False).double()
    target = make_target(online)
    with torch.no_grad():  # a target that differs from the online network, as after some EMA steps
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    views = make_views(images, pretrain.view_config(cfg), torch.Generator().manual_seed(2))
    return cfg, online, target, views


def test_byol_loss_is_the_mean_over_pairs_of_different_views():
    from relicv2_cli.losses import byol_loss

    cfg, online, target, views = _step_inputs("byol", small_crops=1)
    loss, _, _, _ = pretrain._loss(cfg, online, target, views, torch.zeros(8, dtype=torch.long), None,
                                   torch.device("cpu"))
    with torch.no_grad():
        pred = [online(v.double())[2] for v in views.large + views.small]  # per-view BN statistics
        targ = [target(v.double())[1] for v in views.large]
    pairs = [(i, j) for i in range(3) for j in range(2) if i != j]  # 2 large + 1 small online, 2 targets
    expected = sum(byol_loss(pred[i], targ[j]).item() for i, j in pairs) / len(pairs)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_swapped_views_kl_uses_the_other_views_embeddings():
    from relicv2_cli.losses import relic_loss

    cfg, online, target, views = _step_inputs(kl_form="swapped-views", small_crops=1, n_negatives=3)
    gen = torch.Generator().manual_seed(5)
    loss, stats, _, _ = pretrain._loss(cfg, online, target, views, torch.zeros(8, dtype=torch.long), gen,
                                       torch.device("cpu"))
    with torch.no_grad():
        pred = [online(v.double())[2] for v in views.large + views.small]
        targ = [target(v.double())[1] for v in views.large + views.small]  # small targets: only for the KL
    gen = torch.Generator().manual_seed(5)
    total = kl = 0.0
    pairs = [(i, j) for i in range(3) for j in range(2)]  # RELICv2 keeps i == j
    for i, j in pairs:  # q of pair (i, j): online of view j against target of view i
        pair_loss, pair_stats = relic_loss(pred[i], targ[j], 3, cfg.tau, generator=gen,
                                           swapped=(pred[j], targ[i]))
        total, kl = total + pair_loss.item(), kl + pair_stats["kl"].item()
    assert loss.item() == pytest.approx(total / len(pairs), rel=1e-10)
    assert stats["kl"].item() == pytest.approx(kl / len(pairs), rel=1e-10)


def test_bn_statistics_per_view_or_joint():
    cfg, online, _, views = _step_inputs()
    per_view = pretrain._forward(cfg, online, views.large, torch.device("cpu"))[0]
    with torch.no_grad():
        alone = torch.cat([online(v.double())[0] for v in views.large])
        joint = online(torch.cat(views.large).double())[0]
    torch.testing.assert_close(per_view.detach(), alone, rtol=0, atol=1e-12)
    joint_cfg = PretrainConfig(**{**TINY, "precision": "fp64", "bn_stats": "joint"})
    joint_out = pretrain._forward(joint_cfg, online, views.large, torch.device("cpu"))[0]
    torch.testing.assert_close(joint_out.detach(), joint, rtol=0, atol=1e-12)
    assert (alone - joint).abs().max() > 1e-3  # the two statistics really differ


def test_saliency_masks_reach_the_large_views_and_never_the_small_ones(tmp_path, monkeypatch):
    from relicv2_cli.stages.saliency import run as run_saliency

    data = dict(limit_train=TINY["limit_train"], limit_test=TINY["limit_test"])
    sal = run_saliency("synthetic", workdir=tmp_path, quiet=True, **data)
    seen = {}
    real_loss, real_open = pretrain._loss, pretrain.open_masks

    def record_views(cfg, online, target, views, *args, **kwargs):
        seen.setdefault(seen["run"], (torch.cat(views.large), torch.cat(views.small), views.masked.clone()))
        return real_loss(cfg, online, target, views, *args, **kwargs)

    monkeypatch.setattr(pretrain, "_loss", record_views)
    cfg = PretrainConfig(**TINY, saliency=str(sal.path), mask_prob=1.0, max_steps=1)
    seen["run"] = "masks"
    run_pretrain(cfg, workdir=tmp_path, name="masks", quiet=True)
    # The same run with masks that keep every pixel: the same random draws, nothing blacked out.
    monkeypatch.setattr(pretrain, "open_masks", lambda *a: (real_open(*a)[0], real_open(*a)[1] * 0 + 1))
    seen["run"] = "ones"
    run_pretrain(cfg, workdir=tmp_path, name="ones", quiet=True)
    (large_m, small_m, masked_m), (large_1, small_1, masked_1) = seen["masks"], seen["ones"]
    assert masked_m.any() and torch.equal(masked_m, masked_1)
    assert torch.equal(small_m, small_1)  # small crops never see the masks
    assert not torch.equal(large_m, large_1)  # large crops do


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, device):
    cfg = PretrainConfig(**TINY, deterministic=True, max_steps=6)
    whole = run_pretrain(cfg, workdir=tmp_path, name="whole", quiet=True, device=device)

    def kill_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    import typer

    with pytest.raises(typer.Exit) as stopped:
        run_pretrain(cfg, workdir=tmp_path, name="cut", quiet=True, step_callback=kill_at_3, device=device)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    partial = tmp_path / "pretrain" / ".cut.partial"
    assert torch.load(partial / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not (tmp_path / "pretrain" / "cut").exists()
    resumed = run_pretrain(cfg, workdir=tmp_path, name="cut", resume=True, quiet=True, device=device)
    a, b = load_file(whole.path / "backbone.safetensors"), load_file(resumed.path / "backbone.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in records(resumed) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated or missing log lines across the cut
    lr_whole = [r["lr"] for r in records(whole) if "loss" in r]
    assert lr_whole == [r["lr"] for r in records(resumed) if "loss" in r]


def test_resume_with_changed_settings_is_refused(tmp_path):
    import typer

    def kill_at_1(step):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(typer.Exit):
        run_pretrain(PretrainConfig(**TINY, max_steps=4), workdir=tmp_path, name="r", quiet=True,
                     step_callback=kill_at_1)
    with pytest.raises(RelicError, match="different settings.*tau"):
        run_pretrain(PretrainConfig(**TINY, max_steps=4, tau=0.5), workdir=tmp_path, name="r", resume=True,
                     quiet=True)


@pytest.mark.parametrize(("log_every", "checkpoint_every", "steps_run"), [(1, 1, 3), (4, 2, 4)])
def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, log_every,
                                                                    checkpoint_every, steps_run):
    # The flag is read on log and checkpoint steps only: with --log-every 4 --checkpoint-every 2 the
    # loss of step 2 (0-based) turns NaN, step 3 still runs, and step 4 stops before its checkpoint.
    real_loss = pretrain._loss
    calls = []

    def loss_nan_at_step_3(*args, **kwargs):
        loss, *rest = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), *rest

    monkeypatch.setattr(pretrain, "_loss", loss_nan_at_step_3)
    cfg = PretrainConfig(**{**TINY, "log_every": log_every}, max_steps=6, checkpoint_every=checkpoint_every)
    with pytest.raises(RelicError, match="loss became nan at step 2"):
        run_pretrain(cfg, workdir=tmp_path, name="n", quiet=True)
    assert len(calls) == steps_run
    partial = tmp_path / "pretrain" / ".n.partial"
    state = torch.load(partial / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["online"].values() if v.is_floating_point())
    logged = [json.loads(line) for line in (partial / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logged)  # nothing after the NaN reached the log


def test_step_waits_for_the_device_only_on_log_steps(tmp_path, monkeypatch):
    # Reading a tensor on the host (item, tolist, bool, float, int) waits for a GPU. Count such reads
    # made by relicv2_cli code, step by step: between two steps only _after_step of a log step may read.
    reads = []

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if f"{os.sep}relicv2_cli{os.sep}" in sys._getframe(1).f_code.co_filename:
                reads.append(name)
            return real(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    seen = {}
    cfg = PretrainConfig(**{**TINY, "log_every": 3}, max_steps=7, checkpoint_every=100)
    run_pretrain(cfg, workdir=tmp_path, quiet=True,
                 step_callback=lambda step: seen.update({step: len(reads)}))
    # reads between callback(k - 1) and callback(k): _after_step(k - 1) and train_step(k)
    new_reads = {k: seen[k] - seen[k - 1] for k in range(2, 8)}
    log_steps = {1, 3, 6}
    assert all(new_reads[k] > 0 for k in new_reads if k - 1 in log_steps), new_reads  # the counter works
    assert all(new_reads[k] == 0 for k in new_reads if k - 1 not in log_steps), new_reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_step_does_not_synchronise(tmp_path, monkeypatch):
    # torch raises on any synchronising CUDA call inside a step between log steps (step 0 is left out:
    # lazy initialisation; so is the first step of an epoch: it copies that epoch's permutation).
    real_step = pretrain.train_step

    def strict_step(run, step, ddp):
        if step % run.steps_per_epoch == 0:
            return real_step(run, step, ddp)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_step(run, step, ddp)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(pretrain, "train_step", strict_step)
    run_pretrain(PretrainConfig(**{**TINY, "log_every": 8}, max_steps=8), workdir=tmp_path, quiet=True,
                 device="cuda")


@pytest.mark.parametrize(("setting", "device", "precision", "cpu_bf16", "expected"), [
    ("on", "cpu", "fp32", False, True), ("off", "cuda", "bf16", True, False),
    ("auto", "cuda", "fp32", False, True), ("auto", "cpu", "bf16", True, True),
    ("auto", "cpu", "bf16", False, False), ("auto", "cpu", "fp32", True, False),
    ("auto", "cpu", "fp64", True, False),
])
def test_channels_last_auto_follows_device_and_precision(monkeypatch, setting, device, precision, cpu_bf16,
                                                         expected):
    monkeypatch.setattr(pretrain, "_cpu_has_bf16", lambda: cpu_bf16)
    cfg = PretrainConfig(channels_last=setting, precision=precision)
    assert pretrain.use_channels_last(cfg, torch.device(device)) is expected


def test_channels_last_and_compile_change_layout_not_values(tmp_path, monkeypatch):
    # fp64: the memory format and torch.compile (dynamo, eager backend here: no C++ build in a test) must
    # give the same loss and the same checkpoint keys as the plain run.
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: real_compile(self, backend="eager"))
    base = dict(TINY, precision="fp64", max_steps=2, eval_every=0)
    arts = [run_pretrain(PretrainConfig(**base, channels_last=cl, compile=comp), workdir=tmp_path, name=name,
                         quiet=True)
            for name, cl, comp in (("plain", "off", False), ("cl", "on", False), ("compiled", "off", True))]
    losses = [[r["loss"] for r in records(a) if "loss" in r] for a in arts]
    assert losses[1] == pytest.approx(losses[0], rel=1e-9) and losses[2] == pytest.approx(losses[0], rel=1e-9)
    keys = [set(torch.load(a.path / "checkpoint.pt", weights_only=True)["online"]) for a in arts]
    assert keys[0] == keys[1] == keys[2]
    with pytest.raises(RelicError, match="--channels-last must be one of auto, on, off"):
        run_pretrain(PretrainConfig(**base, channels_last="yes"), workdir=tmp_path, quiet=True)


def test_bad_options_give_one_line_errors(cli, tmp_path):
    result = cli("pretrain", "synthetic", "--method", "simclr", "--workdir", tmp_path)
    assert result.code != 0 and "--method must be one of relicv2, byol, supervised" in result.err
    result = cli("pretrain", "synthetic", "--limit-train", "8", "--batch-size", "16", "--workdir", tmp_path)
    assert result.code != 0 and "larger than the training split" in result.err
    result = cli("pretrain", "synthetic", "--saliency", tmp_path / "nope", "--limit-train", "32",
                 "--batch-size", "16", "--workdir", tmp_path)
    assert result.code != 0 and "not found" in result.err
    assert not (tmp_path / "pretrain").exists() or not any((tmp_path / "pretrain").iterdir())


def test_cli_prints_artifact_path_last(cli, tmp_path):
    result = cli("pretrain", "synthetic", "--limit-train", "32", "--limit-test", "16", "--width", "0.25",
                 "--batch-size", "16",
                 "--proj-hidden", "32", "--proj-dim", "16", "--max-steps", "1", "--workdir", tmp_path,
                 "--quiet")
    assert result.code == 0, result.err
    assert result.last_line == str(tmp_path / "pretrain" / "relicv2-synthetic-resnet18")


def test_time_budget_stops_early_evaluates_and_says_why(tmp_path, monkeypatch):
    # A fake clock: every step takes exactly 0.5 s of "training", whatever the machine's load.
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(pretrain, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    real_loss = pretrain._loss

    def slow_loss(*args, **kwargs):
        clock.now += 0.5
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(pretrain, "_loss", slow_loss)
    art = run_pretrain(PretrainConfig(**TINY, max_steps=8, time_budget_min=0.9 / 60), workdir=tmp_path,
                       quiet=True)
    assert art.metrics["steps"] == 2 and art.metrics["stopped_by"] == "time_budget"
    assert art.metrics["train_s"] == 1.0
    assert "knn_top1" in records(art)[-1] and "knn_top1" in art.metrics  # the early stop still evaluates
    assert torch.load(art.path / "checkpoint.pt", weights_only=True)["step"] == 2
