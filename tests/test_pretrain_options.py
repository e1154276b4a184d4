"""pretrain --config and `relicv2 rerun` (same settings, same weights), --logger (fake TensorBoard and
MLflow modules), --precision fp16 (refused on the CPU; the gradient scaler's skipped steps)."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relicv2_cli import artifacts, configfile, distributed, loggers
from relicv2_cli.artifacts import Staging, load_artifact
from relicv2_cli.errors import RelicError
from relicv2_cli.stages import pretrain
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain

# Tiny and deterministic: 16 px images, 2 steps.
FLAGS = ["--limit-train", "16", "--limit-test", "8", "--image-size", "16", "--large-size", "16",
         "--small-size", "8", "--width", "0.25", "--proj-hidden", "32", "--proj-dim", "16",
         "--batch-size", "8", "--n-negatives", "4",
         "--epochs", "2", "--max-steps", "2", "--log-every", "1", "--eval-every", "0", "--precision", "fp32",
         "--deterministic", "--seed", "3"]
SETTINGS = {"limit-train": 16, "limit_test": 8, "image_size": 16, "large_size": 16, "small_size": 8,
            "width": 0.25, "proj_hidden": 32, "proj_dim": 16, "batch_size": 8, "n_negatives": 4,
            "epochs": 2, "max_steps": 2,
            "log_every": 1, "eval_every": 0, "precision": "fp32", "deterministic": True, "seed": 7,
            "time_budget": None, "small_scale_max": 0.14, "kl_form": "target-anchor"}


def without_extra(art):
    return {k: v for k, v in art.config.items() if k != "extra"}


def weights(art):
    return load_file(art.path / "backbone.safetensors")  # bytes differ: the header's key order varies


def test_config_file_and_rerun_reproduce_the_run(tmp_path, cli, monkeypatch):
    runs = tmp_path / "runs"
    flags = cli("pretrain", "synthetic", *FLAGS, "--workdir", runs, "--name", "flags", "--quiet")
    assert flags.code == 0, flags.err
    original = load_artifact(flags.last_line)
    assert json.loads((original.path / pretrain.CONFIG).read_text())["seed"] == 3

    # The file's seed 7 loses against --seed 3 on the command line; everything else comes from the file.
    (tmp_path / "run.json").write_text(json.dumps(SETTINGS))
    from_file = cli("pretrain", "synthetic", "--config", tmp_path / "run.json", "--seed", "3",
                    "--workdir", runs, "--name", "file", "--quiet")
    assert from_file.code == 0, from_file.err
    second = load_artifact(from_file.last_line)
    assert without_extra(second) == without_extra(original)
    assert second.config["extra"] == {"preset": None, "config": str(tmp_path / "run.json")}

    monkeypatch.setattr(artifacts, "_git_revision", lambda: "0000000")  # as if the code moved on
    again = cli("rerun", original.path, "--quiet")
    assert again.code == 0, again.err
    third = load_artifact(again.last_line)
    assert third.path == runs / "pretrain" / "flags-rerun"
    assert f"rerun of {original.path}: code git {original.manifest['tool']['git']} -> 0000000" in again.err
    assert without_extra(third) == without_extra(original)
    assert third.config["extra"]["rerun_of_digest"] == original.digest
    for other in (second, third):
        a, b = weights(original), weights(other)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # An artifact's config.json is itself a settings file.
    assert cli("pretrain", "--config", original.path / pretrain.CONFIG, "--max-steps", "1", "--workdir", runs,
               "--name", "one", "--quiet").code == 0
    assert load_artifact(runs / "pretrain" / "one").config["max_steps"] == 1


def test_settings_file_errors(tmp_path, cli, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"batch_size": "big"}')
    result = cli("pretrain", "--config", bad, "--workdir", tmp_path)
    assert result.code == 2 and result.err == f"error: --config {bad}: batch_size must be int, got 'big'\n"
    bad.write_text('{"workdir": "x"}')
    with pytest.raises(RelicError, match=r"unknown setting 'workdir'; settings are spec, method, "):
        pretrain._with_file(None, {}, bad, None)
    bad.write_text("[1, 2]")
    with pytest.raises(RelicError, match="expected a mapping of setting names to values, got list"):
        configfile.read_settings(bad)
    bad.write_text("{batch_size: 8")
    with pytest.raises(RelicError, match=r"not valid JSON \(Expecting property name"):
        configfile.read_settings(bad)
    with pytest.raises(RelicError, match=r"expected a \.json, \.yaml or \.yml file"):
        configfile.read_settings(tmp_path / "run.toml")
    settings = {"small_scale": [0.1, 0.2], "lr": 2, "max_steps": None, "predictor": False}
    assert configfile.check_settings(PretrainConfig, settings, "x") == {
        "small_scale": (0.1, 0.2), "lr": 2.0, "max_steps": None, "predictor": False}
    with pytest.raises(RelicError, match=r"x: predictor must be bool, got 1"):
        configfile.check_settings(PretrainConfig, {"predictor": 1}, "x")
    with pytest.raises(RelicError, match=r"small_scale must be tuple\[float, float\], got \[0.1\]"):
        configfile.check_settings(PretrainConfig, {"small_scale": [0.1]}, "x")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("batch-size: 8\nsmall_scale: [0.1, 0.2]\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML absent
    with pytest.raises(RelicError, match=r"reading YAML needs PyYAML \(pip install pyyaml\); or write the "
                                         r"settings as a \.json file"):
        configfile.read_settings(yaml_file)


def test_yaml_settings_read_as_json_ones(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "run.yaml").write_text("batch-size: 8\nsmall_scale: [0.1, 0.2]\nmax_steps: null\n"
                                       "blur: true\n")
    (tmp_path / "run.json").write_text('{"batch-size": 8, "small_scale": [0.1, 0.2], "max_steps": null, '
                                       '"blur": true}')
    assert configfile.read_settings(tmp_path / "run.yaml") == configfile.read_settings(tmp_path / "run.json")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(RelicError, match="not valid YAML"):
        configfile.read_settings(tmp_path / "bad.yaml")


def test_rerun_needs_the_recorded_settings(tmp_path, cli):
    with Staging(tmp_path, "pretrain", "old") as staging:
        (staging.dir / "backbone.safetensors").write_bytes(b"")
        old = staging.commit(config={"arch": "resnet18"})
    result = cli("rerun", old.path)
    assert result.code == 2
    assert f"{old.path} has no config.json (made before `relicv2 rerun` existed)" in result.err


class FakeSummaryWriter:
    """torch.utils.tensorboard.SummaryWriter's calls that the logger makes, recorded."""

    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, {}, False
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_gets_one_series_per_metric(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    FakeSummaryWriter.made = []
    cfg = PretrainConfig(spec="synthetic", limit_train=16, limit_test=8, image_size=16, large_size=16,
                         small_size=8, width=0.25, proj_hidden=32, proj_dim=16, batch_size=8, n_negatives=4,
                         epochs=2.0,
                         max_steps=3, log_every=2, eval_every=2, precision="fp32")
    art = run_pretrain(cfg, workdir=tmp_path, name="tb", quiet=True, logger="tensorboard")
    (writer,) = FakeSummaryWriter.made
    assert Path(writer.log_dir).name == "tensorboard" and writer.purge_step is None and writer.closed
    lines = [json.loads(line) for line in (art.path / artifacts.METRICS).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]  # step 1, every 2nd step, the last one
    expected = {}
    for record in lines:
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, []).append((record["step"], float(value)))
    assert {"loss", "lr", "knn_top1", "images_per_s"} <= expected.keys()
    assert writer.scalars == expected


def test_mlflow_logger_and_missing_packages(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(start_run=lambda run_name: calls.append(("start", run_name)),
                                 log_params=lambda params: calls.append(("params", params)),
                                 log_metrics=lambda values, step: calls.append(("metrics", values, step)),
                                 end_run=lambda: calls.append(("end",)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    params = {"lr": 0.1, "small": [1, 2]}
    with loggers.RunLog(tmp_path / "metrics.jsonl", "mlflow", name="run", params=params) as log:
        log.write({"step": 5, "loss": 1.5, "epoch": 0.5, "flag": True, "note": "x"})
    assert calls == [("start", "run"), ("params", {"lr": 0.1, "small": "[1, 2]"}),
                     ("metrics", {"loss": 1.5, "epoch": 0.5}, 5), ("end",)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["note"] == "x"

    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for name in ("mlflow", "tensorboard"):
        with pytest.raises(RelicError, match=rf"^--logger {name} needs the {name} package: "
                                             rf"pip install 'relicv2-cli\[{name}\]'$"):
            loggers.RunLog(tmp_path / "m.jsonl", name)
    with pytest.raises(RelicError, match="--logger must be one of tensorboard, mlflow; got 'wandb'"):
        loggers.RunLog(None, "wandb")


def test_fp16_is_refused_on_the_cpu(tmp_path, cli):
    flags = [f for f in FLAGS if f not in ("--precision", "fp32")]
    result = cli("pretrain", "synthetic", *flags, "--precision", "fp16", "--device", "cpu",
                 "--workdir", tmp_path)
    assert result.code == 2
    assert result.err == ("error: --precision fp16 needs a CUDA device (float16 autocast with a gradient "
                          "scaler); on the CPU use bf16 or fp32\n")
    assert not (tmp_path / "pretrain").exists()


def test_fp16_gradient_scaler_skips_overflowing_steps(tmp_path):
    """The fp16 step path (what CUDA runs), on the CPU's float16 autocast: a scale that makes the
    gradients overflow skips the update and halves the scale; a workable scale updates the weights."""
    cfg = PretrainConfig(spec="synthetic", limit_train=8, limit_test=8, image_size=16, large_size=16,
                         small_size=8, small_crops=0, width=0.25, proj_hidden=32, proj_dim=16, batch_size=8,
                         n_negatives=4,
                         precision="fp16")
    ddp = distributed.setup(torch.device("cpu"))
    run = pretrain.setup(cfg, torch.device("cpu"), ddp)
    assert run.scaler.is_enabled()
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # fp16 gradients overflow at this scale
    before = [p.detach().clone() for p in run.online.parameters()]
    pretrain.train_step(run, 5, ddp)  # past step 0, whose warm-up learning rate is 0
    assert all(torch.equal(a, p) for a, p in zip(before, run.online.parameters(), strict=True))
    assert run.scaler.get_scale() == 2.0**99
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    out = pretrain.train_step(run, 6, ddp)
    assert torch.isfinite(out["loss"])
    changed = [not torch.equal(a, p) for a, p in zip(before, run.online.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2
    assert run.scaler.get_scale() == 2.0**4  # no overflow: kept (it grows after 2000 good steps)
