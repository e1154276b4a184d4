"""The pretrain stage end to end on tiny settings: artifact, export, resume, signals, NaN, saliency checks."""

import json
import os
import signal

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
    cfg = PretrainConfig(**{**TINY, "width": 1.0, "limit_train": 16, "batch_size": 8}, stem="imagenet",
                         max_steps=1)
    art = run_pretrain(cfg, workdir=tmp_path, quiet=True)
    exported = (load_file(art.path / "backbone.safetensors"),
                torch.load(art.path / "backbone.pt", weights_only=True))
    for state in exported:
        result = torchvision.models.resnet18().load_state_dict(state, strict=False)
        assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []


def test_byol_and_supervised_train(tmp_path):
    byol = run_pretrain(PretrainConfig(**TINY, method="byol", max_steps=2), workdir=tmp_path, quiet=True)
    assert 0 <= records(byol)[-1]["loss"] <= 4  # 2 - 2 cos lies in [0, 4]
    sup = run_pretrain(PretrainConfig(**TINY, method="supervised", max_steps=2), workdir=tmp_path, quiet=True)
    assert records(sup)[0]["loss"] == pytest.approx(2.3, abs=0.6)  # cross-entropy near log(10) at init


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = PretrainConfig(**TINY, deterministic=True, max_steps=6)
    whole = run_pretrain(cfg, workdir=tmp_path, name="whole", quiet=True)

    def kill_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    import typer

    with pytest.raises(typer.Exit) as stopped:
        run_pretrain(cfg, workdir=tmp_path, name="cut", quiet=True, step_callback=kill_at_3)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    partial = tmp_path / "pretrain" / ".cut.partial"
    assert torch.load(partial / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not (tmp_path / "pretrain" / "cut").exists()
    resumed = run_pretrain(cfg, workdir=tmp_path, name="cut", resume=True, quiet=True)
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


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = pretrain._loss
    calls = []

    def loss_nan_at_step_3(*args, **kwargs):
        loss, *rest = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), *rest

    monkeypatch.setattr(pretrain, "_loss", loss_nan_at_step_3)
    cfg = PretrainConfig(**TINY, max_steps=5, checkpoint_every=1)
    with pytest.raises(RelicError, match="loss became nan at step 2"):
        run_pretrain(cfg, workdir=tmp_path, name="n", quiet=True)
    state = torch.load(tmp_path / "pretrain" / ".n.partial" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["online"].values() if v.is_floating_point())


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
    real_loss = pretrain._loss

    def slow_loss(*args, **kwargs):  # every step takes at least 0.5 s of "training"
        import time

        time.sleep(0.5)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(pretrain, "_loss", slow_loss)
    art = run_pretrain(PretrainConfig(**TINY, max_steps=8, time_budget_min=0.9 / 60), workdir=tmp_path,
                       quiet=True)
    assert art.metrics["steps"] == 2 and art.metrics["stopped_by"] == "time_budget"
    assert 0.9 <= art.metrics["train_s"] < 3
    assert "knn_top1" in records(art)[-1] and "knn_top1" in art.metrics  # the early stop still evaluates
    assert torch.load(art.path / "checkpoint.pt", weights_only=True)["step"] == 2
