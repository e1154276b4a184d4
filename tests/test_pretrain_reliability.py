"""Issue 19, the pretrain side: NaN stops, option ranges, crashes before a checkpoint, a full disk
during a checkpoint, and hints that work after --force. Rows of docs/reliability.md."""

import errno
import json
import os
import signal

import pytest
import torch
import typer
from safetensors.torch import load_file

from relicv2_cli import artifacts
from relicv2_cli.errors import RelicError
from relicv2_cli.stages import pretrain
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain

TINY = dict(spec="synthetic", limit_train=64, limit_test=32, image_size=16, arch="resnet18", width=0.25,
            proj_hidden=64, proj_dim=32, batch_size=16, epochs=2.0, warmup_epochs=0.5, log_every=1,
            eval_every=0, large_size=16, small_size=8)
TINY_CLI = ["synthetic", "--limit-train", "64", "--limit-test", "32", "--image-size", "16", "--width", "0.25",
            "--proj-hidden", "64", "--proj-dim", "32", "--batch-size", "16", "--max-steps", "2", "--quiet"]


def one_line_error(result, *needles):
    assert result.code == 2, (result.code, result.err)
    assert len(result.err.strip().splitlines()) == 1, result.err
    for needle in needles:
        assert needle in result.err, result.err


def logged_steps(path):
    return [json.loads(line)["step"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for part in ("online", "target") for v in state[part].values()
               if v.is_floating_point())


# ------------------------------------------------------------------------------------------------
# 2: the NaN guard


def test_nan_weights_stop_at_the_checkpoint_and_resume_may_lower_the_lr(tmp_path, monkeypatch):
    real_step = pretrain.train_step

    def weights_nan_after_step_3(run, step, ddp):  # the loss of step 2 is finite, as in the bf16 case
        out = real_step(run, step, ddp)
        if step == 2:
            with torch.no_grad():
                run.online.encoder.layer4[0].conv1.weight[0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(pretrain, "train_step", weights_nan_after_step_3)
    cfg = PretrainConfig(**TINY, max_steps=5, checkpoint_every=1)
    partial = tmp_path / "pretrain" / ".n.partial"
    message = (r"^1 weight and optimiser tensors became NaN or infinite by step 3 \(first "
               r"online\.encoder\.layer4\.0\.conv1\.weight\) while the loss was finite; stopped\. The last "
               rf"checkpoint with finite weights \(step 2\) is kept in {partial}: continue from it with "
               r"--resume and a lower --lr or --precision fp32$")
    with pytest.raises(RelicError, match=message):
        run_pretrain(cfg, workdir=tmp_path, name="n", quiet=True)
    kept = torch.load(partial / "checkpoint.pt", weights_only=True)
    assert kept["step"] == 2 and finite(kept)

    monkeypatch.setattr(pretrain, "train_step", real_step)
    with pytest.raises(RelicError, match="different settings.*tau"):  # only the step size may change
        run_pretrain(PretrainConfig(**TINY, max_steps=5, checkpoint_every=1, lr=0.5, tau=0.5),
                     workdir=tmp_path, name="n", resume=True, quiet=True)
    art = run_pretrain(PretrainConfig(**TINY, max_steps=5, checkpoint_every=1, lr=0.5), workdir=tmp_path,
                       name="n", resume=True, quiet=True)
    assert art.config["lr"] == 0.5 and art.metrics["steps"] == 5
    assert logged_steps(art.path) == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(v).all() for v in load_file(art.path / "backbone.safetensors").values())
    assert sorted(p.name for p in art.path.iterdir()) == ["backbone.pt", "backbone.safetensors",
                                                          "checkpoint.pt", "config.json", "manifest.json",
                                                          "metrics.jsonl"]


def interrupt_after_step_1(tmp_path, name: str) -> None:
    """A TINY 3-step run stopped by SIGTERM after its first step (it checkpoints and exits)."""
    def kill_at_1(step):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(typer.Exit):
        run_pretrain(PretrainConfig(**TINY, max_steps=3), workdir=tmp_path, name=name, quiet=True,
                     step_callback=kill_at_1)


def test_resume_may_not_change_the_lr_after_an_ordinary_interruption(tmp_path):
    interrupt_after_step_1(tmp_path, "s")
    with pytest.raises(RelicError, match="different settings.*base_lr_scaled, lr$"):
        run_pretrain(PretrainConfig(**TINY, max_steps=3, lr=0.5), workdir=tmp_path, name="s", resume=True,
                     quiet=True)


def test_a_checkpoint_older_than_a_config_key_resumes_as_its_old_value(tmp_path):
    interrupt_after_step_1(tmp_path, "old")
    path = tmp_path / "pretrain" / ".old.partial" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert state["config"]["streamed"] is False and state["config"]["mask_min_area"] == 0.05
    # as written before the streamed and mask_min_area keys existed
    del state["config"]["streamed"], state["config"]["mask_min_area"]
    torch.save(state, path)
    # mask_min_area's old behaviour (every mask applied) is 0.0, not today's default
    with pytest.raises(RelicError, match="different settings than the interrupted run: mask_min_area$"):
        run_pretrain(PretrainConfig(**TINY, max_steps=3), workdir=tmp_path, name="old", resume=True,
                     quiet=True)
    art = run_pretrain(PretrainConfig(**TINY, max_steps=3, mask_min_area=0.0), workdir=tmp_path, name="old",
                       resume=True, quiet=True)
    assert logged_steps(art.path) == [1, 2, 3] and art.config["streamed"] is False


def test_nan_loss_before_any_checkpoint_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    real_loss = pretrain._loss
    calls = []

    def loss_nan_at_step_2(*args, **kwargs):
        loss, *rest = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), *rest

    monkeypatch.setattr(pretrain, "_loss", loss_nan_at_step_2)
    with pytest.raises(RelicError, match=r"^loss became nan at step 2; stopped\. No checkpoint was written "
                                         r"before it, so there is nothing to resume: rerun with a lower "
                                         r"--lr or --precision fp32$"):
        run_pretrain(PretrainConfig(**TINY, max_steps=4), workdir=tmp_path, name="n", quiet=True)
    assert list((tmp_path / "pretrain").iterdir()) == []
    monkeypatch.setattr(pretrain, "_loss", real_loss)
    art = run_pretrain(PretrainConfig(**TINY, max_steps=2), workdir=tmp_path, name="n", quiet=True)
    assert art.metrics["steps"] == 2  # the rerun needs no --force


# ------------------------------------------------------------------------------------------------
# 6: option ranges


@pytest.mark.parametrize("args, message", [
    (["--n-negatives", "-5"], "--n-negatives must be at least 1 and below --batch-size 16 (the negatives are "
                              "other images of the batch), got -5"),
    (["--n-negatives", "0"], "--n-negatives must be at least 1 and below --batch-size 16"),
    (["--n-negatives", "16"], "--n-negatives must be at least 1 and below --batch-size 16"),
    (["--batch-size", "1"], "--batch-size must be at least 2 and finite, got 1"),
    (["--ema-base", "5"], "--ema-base must be in [0, 1], got 5.0"),
    (["--mask-prob", "nan"], "--mask-prob must be in [0, 1], got nan"),
    (["--small-scale-min", "0.5", "--small-scale-max", "0.1"],
     "--small-scale-min 0.5 is above --small-scale-max 0.1"),
    (["--large-scale-min", "0"], "--large-scale-min must be in (0, 1], got 0.0"),
    (["--small-scale-max", "2"], "--small-scale-max must be in (0, 1], got 2.0"),
    (["--warmup-epochs", "-5"], "--warmup-epochs must be at least 0 and finite, got -5.0"),
    (["--tau", "nan"], "--tau must be positive and finite, got nan"),
    (["--lr", "-1"], "--lr must be positive and finite, got -1.0"),
    (["--lr", "inf"], "--lr must be positive and finite, got inf"),
    (["--epochs", "nan"], "--epochs must be positive and finite, got nan"),
    (["--large-size", "0"], "--large-size must be at least 8 and finite, got 0"),
    (["--small-size", "4"], "--small-size must be at least 8 and finite, got 4"),
    (["--weight-decay", "-1e-5"], "--weight-decay must be at least 0 and finite, got -1e-05"),
    (["--alpha", "inf"], "--alpha must be at least 0 and finite, got inf"),
    (["--alpha", "0", "--beta", "0"], "--alpha 0 and --beta 0 leave no loss to train on"),
    (["--lars-eta", "0"], "--lars-eta must be positive and finite, got 0.0"),
    (["--eval-every", "-1"], "--eval-every must be at least 0 and finite, got -1"),
    (["--proj-dim", "0"], "--proj-dim must be positive and finite, got 0"),
])
def test_pretrain_options_out_of_range_are_refused_before_anything_is_written(cli, tmp_path, args, message):
    result = cli("pretrain", *TINY_CLI, *args, "--workdir", tmp_path)
    one_line_error(result, message)
    assert not (tmp_path / "pretrain").exists()


@pytest.mark.parametrize("args, message", [
    (["eval", "linear", "--lr", "nan"], "--lr must be positive and finite, got nan"),
    (["eval", "linear", "--epochs", "inf"], "--epochs must be positive and finite, got inf"),
    (["eval", "semi", "--fraction", "0.1", "--lr", "nan"], "--lr must be positive and finite, got nan"),
    (["eval", "semi", "--fraction", "0.1", "--batch-size", "0"], "--batch-size must be positive and finite"),
    (["eval", "semi", "--fraction", "nan"], "--fraction must be in (0, 1], got nan"),
    (["eval", "transfer", "--finetune", "--lr", "nan"], "--lr must be positive and finite, got nan"),
])
def test_eval_options_out_of_range_are_refused(cli, tmp_path, args, message):
    result = cli(*args, "random:resnet18", "synthetic", "--width", "0.25", "--limit-train", "40",
                 "--limit-test", "20", "--image-size", "16", "--quiet", "--workdir", tmp_path)
    one_line_error(result, message)


# ------------------------------------------------------------------------------------------------
# 7: a crash before the first checkpoint


def test_crash_before_the_first_checkpoint_leaves_nothing_after_it_a_resumable_run(tmp_path):
    def crash_at(at):
        def callback(step):
            if step == at:
                raise MemoryError("out of memory (simulated)")
        return callback

    cfg = PretrainConfig(**TINY, max_steps=3, checkpoint_every=2)
    with pytest.raises(MemoryError):
        run_pretrain(cfg, workdir=tmp_path, name="c", quiet=True, step_callback=crash_at(1))
    assert list((tmp_path / "pretrain").iterdir()) == []  # nothing to resume, nothing in the way
    with pytest.raises(MemoryError):
        run_pretrain(cfg, workdir=tmp_path, name="c", quiet=True, step_callback=crash_at(3))
    partial = tmp_path / "pretrain" / ".c.partial"
    assert torch.load(partial / "checkpoint.pt", weights_only=True)["step"] == 2
    with pytest.raises(RelicError, match="an interrupted run left .*; pass --resume to continue it"):
        run_pretrain(cfg, workdir=tmp_path, name="c", quiet=True)
    assert run_pretrain(cfg, workdir=tmp_path, name="c", resume=True, quiet=True).metrics["steps"] == 3


# ------------------------------------------------------------------------------------------------
# 9: a full disk during a checkpoint


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
    class FullDisk:
        """A file that takes `room` bytes, then fails as a full disk does (errno 28)."""

        def __init__(self, file, room):
            self.file, self.room = file, room

        def write(self, data):
            self.room -= len(data)
            if self.room < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

    def fill_disk_at_step_2(step):
        if step == 2:
            monkeypatch.setattr(artifacts, "open", lambda path, mode: FullDisk(open(path, mode), 100_000),
                                raising=False)

    partial = tmp_path / "pretrain" / ".d.partial"
    cfg = PretrainConfig(**TINY, max_steps=3, checkpoint_every=1)
    with pytest.raises(RelicError, match=rf"^no space left on device writing {partial}/checkpoint.pt; free "
                                         r"some space and rerun$"):
        run_pretrain(cfg, workdir=tmp_path, name="d", quiet=True, step_callback=fill_disk_at_step_2)
    # no .tmp left
    assert sorted(p.name for p in partial.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert artifacts.load_torch_file(partial / "checkpoint.pt")["step"] == 1
    monkeypatch.delattr(artifacts, "open")
    assert run_pretrain(cfg, workdir=tmp_path, name="d", resume=True, quiet=True).metrics["steps"] == 3


# ------------------------------------------------------------------------------------------------
# 10: hints that work after --force


def test_interrupted_force_run_prints_the_flags_that_continue_it(tmp_path, capsys):
    cfg = PretrainConfig(**TINY, max_steps=2)
    run_pretrain(cfg, workdir=tmp_path, name="f", quiet=True)

    def kill_at_1(step):
        os.kill(os.getpid(), signal.SIGTERM)

    capsys.readouterr()
    with pytest.raises(typer.Exit):
        run_pretrain(cfg, workdir=tmp_path, name="f", force=True, quiet=True, step_callback=kill_at_1)
    assert "continue with --resume --force" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(RelicError, match=r"artifact exists: .*/f; --resume --force continues the "
                                         r"interrupted run and replaces it$"):
        run_pretrain(cfg, workdir=tmp_path, name="f", resume=True, quiet=True)
    art = run_pretrain(cfg, workdir=tmp_path, name="f", force=True, resume=True, quiet=True)
    assert art.metrics["steps"] == 2 and logged_steps(art.path) == [1, 2]


def test_imagenet_stem_with_tiny_crops_in_cpu_bf16_is_refused(tmp_path):
    # torch's bf16 CPU convolution backward on layer4's 1x1 maps gives NaN or ~1e27 weight gradients
    with pytest.raises(RelicError, match=r"--stem imagenet with 8 px crops leaves layer4 1x1 maps.*"
                                         r"--precision fp32$"):
        run_pretrain(PretrainConfig(**TINY, stem="imagenet", max_steps=1), workdir=tmp_path, quiet=True)
    assert not (tmp_path / "pretrain").exists()
    art = run_pretrain(PretrainConfig(**TINY, stem="imagenet", max_steps=1, precision="fp32"),
                       workdir=tmp_path, quiet=True)
    assert art.metrics["steps"] == 1
