"""Multi-process pretraining: 2 CPU processes on gloo (loopback), launched the real way with
`python -m torch.distributed.run --nproc_per_node=2 -m relicv2_cli pretrain ...`.

Tolerances. The runs are in float64 (`--precision fp64`), where one process and two processes
compute the same thing up to the order of sums (BatchNorm statistics, gradients and losses summed in
two halves): measured <= 3e-15 relative on the loss and <= 2e-12 relative on every tensor's update
(w_final - w_init) after 4 steps. The tests allow 1e-10 and 1e-8. In fp32 the same runs differ by
up to ~2e-5 on the loss and several % on some updates, and by how much depends on the CPU's kernels
(AMX vs AVX-512): some BatchNorm gradients are sums that nearly cancel, and training amplifies the
rounding step by step. float64 leaves so much margin that the tolerances hold on any CPU.

This file is also the worker script the tests launch (`python tests/test_distributed.py worker|unit`):
it runs the real CLI with test hooks (a signal or a SIGKILL at a chosen step, a checkpoint write that
hangs half-way) or the float64 unit checks.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from relicv2_cli.models import ema_rate
from relicv2_cli.optim import lr_at
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain

THIS = Path(__file__).resolve()
STEPS = 4
# One tiny run, spelled once for the CLI and once for run_pretrain (same config on --resume).
SETTINGS = dict(spec="synthetic", limit_train=64, limit_test=32, image_size=16, large_size=16, small_size=8,
                width=0.25, proj_hidden=64, proj_dim=32, batch_size=16, epochs=2.0, warmup_epochs=0.0, lr=0.2,
                log_every=1, eval_every=0, precision="fp64", deterministic=True, checkpoint_every=2)
CLI_ARGS = ["synthetic", "--limit-train", "64", "--limit-test", "32", "--image-size", "16",
            "--large-size", "16", "--small-size", "8", "--width", "0.25", "--proj-hidden", "64",
            "--proj-dim", "32", "--batch-size", "16",
            "--epochs", "2", "--warmup-epochs", "0", "--lr", "0.2", "--log-every", "1", "--eval-every", "0",
            "--precision", "fp64", "--deterministic", "--checkpoint-every", "2", "--quiet"]
# Linear biases feeding a BatchNorm: their true gradient is 0, so their (tiny) updates are rounding noise.
PRE_BN_BIASES = ("projector.0.bias", "predictor.0.bias", "projector.3.bias")


def cfg(**overrides) -> PretrainConfig:
    return PretrainConfig(**{**SETTINGS, "max_steps": STEPS, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], *, nproc: int | None = 2, max_restarts: int = 0, timeout: float = 150,
           hooks: list[str] | None = None) -> subprocess.CompletedProcess:
    """torchrun (nproc processes) or a plain process (nproc None) running the CLI; `hooks` runs it
    through this file's worker mode."""
    target = ([str(THIS), "worker", *hooks, "--", "pretrain", *args] if hooks is not None
              else ["-m", "relicv2_cli", "pretrain", *args])
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}", f"--max-restarts={max_restarts}", "--monitor-interval=0.2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd + target, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=THIS.parents[1])


def checkpoint(path: Path) -> dict:
    return torch.load(path / "checkpoint.pt", weights_only=True)


def records(path: Path) -> list[dict]:
    return [r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_training(state: dict, ref: dict, init: dict, tol: float = 1e-8) -> None:
    """Every tensor's update from init agrees with the reference's to `tol` (relative norm)."""
    for part in ("online", "target", "probe"):
        for key, value in ref[part].items():
            if not value.is_floating_point():
                assert torch.equal(state[part][key], value), (part, key)
                continue
            expected = value.double() - init[part][key].double()
            got = state[part][key].double() - init[part][key].double()
            err = (got - expected).norm().item()
            if key in PRE_BN_BIASES:
                assert err < 1e-12, (part, key, err)
            else:
                assert err <= tol * expected.norm().item() + 1e-12, (part, key, err / expected.norm().item())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, whole batch: the run every multi-process run is compared with."""
    torch.set_num_threads(1)  # module scope: set up before conftest's per-test one_thread fixture
    workdir = tmp_path_factory.mktemp("reference")
    # initial weights: step 0 of a warm-up has lr 0 (--lr itself must be positive)
    init = run_pretrain(cfg(max_steps=1, warmup_epochs=1.0), workdir=workdir, name="init", quiet=True)
    ref = run_pretrain(cfg(), workdir=workdir, name="ref", quiet=True)
    return SimpleNamespace(init=checkpoint(init.path), state=checkpoint(ref.path), records=records(ref.path),
                           config=ref.config)


@pytest.fixture(scope="module")
def unit_checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("unit")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(THIS), "unit", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=THIS.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


# ---------------------------------------------------------------------------------------------------
# float64 unit checks on 2 processes


def test_sync_batchnorm_equals_batchnorm_on_the_whole_batch(unit_checks):
    for rank in unit_checks:
        for name in ("bn2d", "bn1d"):
            assert rank[name]["is_dist_bn"]
            for what, err in rank[name]["errors"].items():
                assert err < 1e-9, (name, what, err)  # output, input grad, weight/bias grads, running stats


def test_negatives_come_from_the_global_batch(unit_checks):
    for rank in unit_checks:
        assert rank["gathered_equal_global_batch"]  # rank r's rows at r * b, for every gathered tensor
        assert rank["negatives_equal_one_process"]  # this rank's rows of the one-process draw
        assert rank["loss_error"] < 1e-6  # mean of the ranks' losses = the one-process loss
    assert unit_checks[0]["negatives_on_other_rank"] > 0  # an anchor on rank 0 drew rows living on rank 1
    assert unit_checks[1]["negatives_on_other_rank"] > 0


def test_ddp_step_equals_one_process_step(unit_checks):
    for rank in unit_checks:
        assert rank["ddp_grad_error"] < 1e-9 and rank["ddp_weight_error"] < 1e-9
        assert rank["sharded_encode_equal"]  # the kNN / probe evaluation sees every image once


# ---------------------------------------------------------------------------------------------------
# end to end, through torchrun -m relicv2_cli pretrain


def test_two_processes_match_one_process(reference, tmp_path):
    proc = launch([*CLI_ARGS, "--max-steps", str(STEPS), "--dist-sampling", "global", "--workdir",
                   str(tmp_path),
                   "--name", "two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    art = tmp_path / "pretrain" / "two"
    assert proc.stdout.strip().splitlines()[-1] == str(art)  # rank 0 alone prints the path
    rows = records(art)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # rank 0 alone writes the log
    for got, want in zip(rows, reference.records, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-10)
        # lr scaled by the global batch
        assert got["lr"] == want["lr"] and got["ema_rate"] == want["ema_rate"]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["config"]["extra"]["world_size"] == 2
    assert manifest["config"]["base_lr_scaled"] == reference.config["base_lr_scaled"]
    assert_same_training(checkpoint(art), reference.state, reference.init)


def test_sigterm_stops_every_process_then_resume_continues(reference, tmp_path):
    # torchrun itself gets SIGTERM (as from a scheduler) after step 1: it forwards it to the workers,
    # which stop after the same step, rank 0 checkpoints, every process exits 143 (128 + SIGTERM).
    proc = launch([*CLI_ARGS, "--max-steps", str(STEPS), "--workdir", str(tmp_path), "--name", "cut"],
                  hooks=["--rank", "1", "--sigterm-parent-at", "1"])
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in proc.stderr
    partial = tmp_path / "pretrain" / ".cut.partial"
    stopped_at = checkpoint(partial)["step"]
    assert 1 <= stopped_at < STEPS
    assert [r["step"] for r in records(partial)] == list(range(1, stopped_at + 1))
    assert not (tmp_path / "pretrain" / "cut").exists()
    # Resume (here in one process: checkpoints do not depend on the number of processes).
    resumed = run_pretrain(cfg(), workdir=tmp_path, name="cut", resume=True, quiet=True)
    rows = records(resumed.path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for got, want in zip(rows, reference.records, strict=True):
        assert got["lr"] == want["lr"] and got["ema_rate"] == want["ema_rate"]
    total = reference.config["total_steps"]
    assert rows[stopped_at]["lr"] == lr_at(stopped_at, total, reference.config["base_lr_scaled"], 0)
    assert rows[stopped_at]["ema_rate"] == ema_rate(stopped_at, total, SETTINGS.get("ema_base", 0.99))


def test_sigterm_on_one_rank_stops_all_at_the_same_step(reference, tmp_path):
    # Only rank 1 gets SIGTERM, after step 2: the flag all-reduced every step stops rank 0 after the
    # same step; rank 0 checkpoints, both exit 143 and torchrun reports the failure (exit 1).
    proc = launch([*CLI_ARGS, "--max-steps", str(STEPS), "--dist-sampling", "global", "--workdir",
                   str(tmp_path),
                   "--name", "one-rank"], hooks=["--rank", "1", "--sigterm-at", "2"])
    assert proc.returncode == 1
    assert proc.stderr.count("exitcode  : 143") == 2, proc.stderr[-3000:]
    assert proc.stderr.count("stopped by SIGTERM at step 2/4") == 2
    partial = tmp_path / "pretrain" / ".one-rank.partial"
    assert checkpoint(partial)["step"] == 2
    assert [r["step"] for r in records(partial)] == [1, 2]
    # --dist-sampling global: the run is independent of the number of processes, so a one-process
    # resume ends where the uninterrupted one-process run does.
    resumed = run_pretrain(cfg(), workdir=tmp_path, name="one-rank", resume=True, quiet=True,
                           dist_sampling="global")
    assert [r["step"] for r in records(resumed.path)] == list(range(1, STEPS + 1))
    assert_same_training(checkpoint(resumed.path), reference.state, reference.init)


def test_dead_rank_fails_the_others_and_max_restarts_resumes(reference, tmp_path):
    # Rank 1 is SIGKILLed after step 3 (last checkpoint: step 2) in the first attempt only. Rank 0 must
    # fail with a clear message instead of hanging; torchrun restarts both; --resume continues from
    # step 2 and the run ends with the same weights as the uninterrupted one-process run.
    proc = launch([*CLI_ARGS, "--max-steps", str(STEPS), "--dist-sampling", "global", "--resume",
                   "--dist-timeout", "30",
                   "--workdir", str(tmp_path), "--name", "crash"], max_restarts=1,
                  hooks=["--rank", "1", "--sigkill-at", "3", "--first-attempt-only"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0 of 2 lost contact with the others" in proc.stderr
    art = tmp_path / "pretrain" / "crash"
    rows = records(art)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # step 3 of the failed attempt dropped
    for got, want in zip(rows, reference.records, strict=True):
        assert got["lr"] == want["lr"] and got["ema_rate"] == want["ema_rate"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-10)
    assert_same_training(checkpoint(art), reference.state, reference.init)


def test_kill_9_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path):
    marker = tmp_path / "writing"
    args = [*CLI_ARGS, "--max-steps", str(STEPS), "--checkpoint-every", "1", "--workdir", str(tmp_path),
            "--name", "k9"]
    cmd = [sys.executable, str(THIS), "worker", "--hang-checkpoint-write", "3", "--marker", str(marker), "--",
           "pretrain", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=THIS.parents[1])
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the third checkpoint write never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # half of checkpoint.pt.tmp is on disk
    finally:
        proc.kill()
        proc.wait()
    partial = tmp_path / "pretrain" / ".k9.partial"
    (half_written,) = partial.glob(".checkpoint.pt.*.tmp")
    with pytest.raises(Exception):  # noqa: B017  the interrupted write is garbage...
        torch.load(half_written, weights_only=True)
    assert checkpoint(partial)["step"] == 2  # ...and the previous checkpoint is whole
    resumed = run_pretrain(cfg(checkpoint_every=1), workdir=tmp_path, name="k9", resume=True, quiet=True)
    assert [r["step"] for r in records(resumed.path)] == list(range(1, STEPS + 1))
    assert list(resumed.path.glob("*.tmp")) + list(resumed.path.glob(".*")) == []  # the stale one is gone
    # one process: exact
    assert_same_training(checkpoint(resumed.path), reference.state, reference.init, tol=1e-12)


def imagenet_layout(root: Path) -> Path:
    """train/ + val/ with three class folders of JPEGs of mixed sizes and aspect ratios, as ImageNet's."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(24, 81, 2)
                image = (rng.random((h, w, 3)) * 120).astype(np.uint8)
                image[..., c] = 255
                cv2.imwrite(str(root / split / wnid / f"{wnid}_{i}.JPEG"), image)
    return root


def test_streamed_prepared_set_two_processes_match_one(tmp_path):
    # A prepared ImageNet-layout folder streamed by 2 processes (each decoding only its half of every
    # step's images) trains as 1 process with the same global batch, in float64.
    from relicv2_cli.stages.prepare import run as prepare

    art = prepare(f"imagefolder:{imagenet_layout(tmp_path / 'imagenet')}", workdir=tmp_path, workers=1,
                  quiet=True)
    spec = f"prepared:{art.path}"
    settings = dict(large_size=16, small_size=8, width=0.25, proj_hidden=64, proj_dim=32, batch_size=16,
                    epochs=2.0, warmup_epochs=0.0, lr=0.2, log_every=1, eval_every=0, precision="fp64",
                    deterministic=True, in_memory="no", workers=0, max_steps=3)
    one = run_pretrain(PretrainConfig(spec=spec, **settings), workdir=tmp_path, name="one", quiet=True)
    args = [spec, "--large-size", "16", "--small-size", "8", "--width", "0.25", "--proj-hidden", "64",
            "--proj-dim", "32", "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "0", "--lr", "0.2",
            "--log-every", "1", "--eval-every", "0", "--precision", "fp64", "--deterministic",
            "--in-memory", "no", "--workers", "0", "--max-steps", "3", "--dist-sampling", "global",
            "--workdir", str(tmp_path), "--name", "two", "--quiet"]
    proc = launch(args, hooks=["--count-decodes", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "pretrain" / "two"
    assert json.loads((two / "manifest.json").read_text())["config"]["streamed"] is True
    rows, want = records(two), records(one.path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for got, ref in zip(rows, want, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-10)
        assert got["lr"] == ref["lr"] and got["ema_rate"] == ref["ema_rate"]
    init = run_pretrain(PretrainConfig(spec=spec, **{**settings, "max_steps": 1, "warmup_epochs": 1.0}),
                        workdir=tmp_path, name="init", quiet=True)
    assert_same_training(checkpoint(two), checkpoint(one.path), checkpoint(init.path))
    # each process decoded its 8 of the 16 images of each of the 3 steps
    assert [int((tmp_path / f"decodes{r}.txt").read_text()) for r in (0, 1)] == [24, 24]


# ---------------------------------------------------------------------------------------------------
# worker modes (run as a script by the tests above)


def _worker(argv: list[str]) -> None:
    import argparse

    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--sigterm-parent-at", type=int)
    parser.add_argument("--sigterm-at", type=int)
    parser.add_argument("--sigkill-at", type=int)
    parser.add_argument("--first-attempt-only", action="store_true")
    parser.add_argument("--hang-checkpoint-write", type=int)
    parser.add_argument("--marker")
    parser.add_argument("--count-decodes")  # a folder: each rank writes its number of decoded images
    opts = parser.parse_args(argv[:split])
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def callback(step: int) -> None:
        if rank != opts.rank or (opts.first_attempt_only and attempt > 0):
            return
        if step == opts.sigterm_parent_at:
            os.kill(os.getppid(), signal.SIGTERM)  # the torchrun agent
        if step == opts.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # this process only
        if step == opts.sigkill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    from relicv2_cli.stages import pretrain

    pretrain.run_pretrain = functools.partial(pretrain.run_pretrain, step_callback=callback)
    if opts.count_decodes:  # with --workers 0 every image is cropped in this process
        import atexit

        from relicv2_cli import stream

        real_crop, decodes = stream.crop_image, []
        stream.crop_image = lambda *args, **kwargs: decodes.append(1) or real_crop(*args, **kwargs)
        counted = Path(opts.count_decodes) / f"decodes{rank}.txt"
        atexit.register(lambda: counted.write_text(str(len(decodes))))
    if opts.hang_checkpoint_write:
        real_save, writes = torch.save, []

        def save(obj, f, *args, **kwargs):  # f: the file object of artifacts.atomic_write
            if re.fullmatch(r"\.checkpoint\.pt\.[0-9a-f]{8}\.tmp", Path(getattr(f, "name", "")).name):
                writes.append(f)
                if len(writes) == opts.hang_checkpoint_write:
                    buffer = io.BytesIO()
                    real_save(obj, buffer)
                    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    Path(opts.marker).write_text("writing")
                    time.sleep(600)  # killed here
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    from relicv2_cli.cli import main

    sys.argv = ["relicv2", *argv[split + 1 :]]
    main()


def _unit(out: Path) -> None:
    """float64 checks on 2 processes; each rank writes rank{r}.json."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from relicv2_cli import distributed
    from relicv2_cli.losses import relic_loss, sample_negatives
    from relicv2_cli.optim import build_optimizer

    torch.set_num_threads(1)
    ctx = distributed.setup(torch.device("cpu"), 60.0, "global")
    rank, world = ctx.rank, ctx.world_size
    result: dict = {}
    g = torch.Generator().manual_seed(0)

    def rows(n: int) -> slice:
        b = n // world
        return slice(rank * b, (rank + 1) * b)

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.double() - b.double()).abs().max().item()

    # BatchNorm: DistBatchNorm on half batches == BatchNorm on the whole (mean far from 0 on purpose).
    for name, shape, cls in (("bn2d", (8, 5, 4, 4), nn.BatchNorm2d), ("bn1d", (8, 6), nn.BatchNorm1d)):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 50
        weights = torch.randn(shape, generator=g, dtype=torch.float64)
        ref = cls(shape[1]).double()
        with torch.no_grad():
            ref.weight.copy_(torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5)
            ref.bias.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64))
        mine = distributed.convert_sync_batchnorm(copy.deepcopy(ref), torch.device("cpu"))
        errors = {}
        for _ in range(2):  # two steps: running statistics accumulate
            for p in (*ref.parameters(), *mine.parameters()):
                p.grad = None
            xr = x.clone().requires_grad_()
            yr = ref(xr)
            (yr * weights).sum().backward()
            xl = x[rows(shape[0])].clone().requires_grad_()
            yl = mine(xl)
            (yl * weights[rows(shape[0])]).sum().backward()  # this rank's share of the same sum
            grads = [mine.weight.grad.clone(), mine.bias.grad.clone()]
            for t in grads:
                dist.all_reduce(t)
            errors = {"output": err(yl, yr[rows(shape[0])]),
                      "input_grad": err(xl.grad, xr.grad[rows(shape[0])]),
                      "weight_grad": err(grads[0], ref.weight.grad),
                      "bias_grad": err(grads[1], ref.bias.grad),
                      "running_mean": err(mine.running_mean, ref.running_mean),
                      "running_var": err(mine.running_var, ref.running_var),
                      "batches": float(mine.num_batches_tracked != ref.num_batches_tracked)}
            x = x * 0.5 + 3
        result[name] = {"is_dist_bn": isinstance(mine, distributed.DistBatchNorm), "errors": errors}

    # Negatives: candidates from the all-gathered batch, the one-process draw split by rows.
    n, b = 16, 16 // world
    online, target = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    ref_loss, _ = relic_loss(online, target, n_negatives=5, generator=torch.Generator().manual_seed(7))
    ref_negatives = sample_negatives(n, 5, torch.Generator().manual_seed(7), "cpu")
    online_pool, target_pool = ctx.gather([online[rows(n)], target[rows(n)]])  # one all-gather for both
    same = torch.equal(online_pool, online) and torch.equal(target_pool, target)
    result["gathered_equal_global_batch"] = bool(same)
    loss, _ = relic_loss(online[rows(n)], target[rows(n)], n_negatives=5,
                         generator=torch.Generator().manual_seed(7),
                         target_pool=target_pool, online_pool=online_pool, offset=rank * b, global_rows=True)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    negatives = sample_negatives(b, 5, torch.Generator().manual_seed(7), "cpu", offset=rank * b, pool=n,
                                 global_rows=True)
    result["negatives_equal_one_process"] = bool(torch.equal(negatives, ref_negatives[rows(n)]))
    result["negatives_on_other_rank"] = int(((negatives // b) != rank).sum())
    result["loss_error"] = abs(mean.item() / world - ref_loss.item())

    # A DDP step with synchronised BatchNorm and a mean loss == the one-process step on the whole batch.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(),
                          nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    ref_model = copy.deepcopy(model)
    local = ctx.sync_batchnorm(model)
    wrapped = ctx.wrap(local)
    opts = [build_optimizer("lars", m, 0.5, 1e-4, lars_eta=0.02) for m in (ref_model, local)]
    x = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    for _ in range(2):
        for opt, net, xs, ys in ((opts[0], ref_model, x, y), (opts[1], wrapped, x[rows(8)], y[rows(8)])):
            opt.zero_grad()
            F.cross_entropy(net(xs), ys).backward()
            opt.step()
        pairs = zip(local.parameters(), ref_model.parameters(), strict=True)
        result["ddp_grad_error"] = max(err(p.grad, q.grad) for p, q in pairs)
        x = x + 0.1
    pairs = zip(local.parameters(), ref_model.parameters(), strict=True)
    result["ddp_weight_error"] = max(err(p, q) for p, q in pairs)

    # Evaluation embeds a share of the images per process and all-gathers (7 rows: uneven shares).
    images = torch.arange(7 * 3, dtype=torch.float64).reshape(7, 3)
    sharded = ctx.encode(lambda encoder, batch, **kw: batch * 2 + kw["offset"])(None, images, offset=1.0)
    result["sharded_encode_equal"] = bool(torch.equal(sharded, images * 2 + 1))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        _worker(sys.argv[2:])
    elif sys.argv[1] == "unit":
        _unit(Path(sys.argv[2]))
