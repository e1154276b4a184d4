"""Training curves in `relicv2 report`: one subplot per metric of metrics.jsonl, against step."""

import json

import numpy as np
import pytest

from relicv2_cli import curves
from relicv2_cli.artifacts import Staging
from relicv2_cli.errors import RelicError
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain


def fake_run(workdir, name, records):
    with Staging(workdir, "pretrain", name) as staging:
        (staging.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return staging.commit(config={"arch": "resnet18", "width": 0.25, "stem": "cifar", "method": "byol"})


def test_one_subplot_per_metric_with_its_own_steps():
    records = [{"step": s, "epoch": s / 4, "loss": 2.0 / s, "lr": 0.1 * s, "zeta": 1.0} for s in (1, 2, 3, 4)]
    records.insert(2, {"step": 2, "knn_top1": 0.3})  # an evaluation between log lines
    records.append({"step": 4, "knn_top1": 0.5})
    fig, drawn = curves.curves_figure(records, "run")
    assert drawn == ["loss", "lr", "knn_top1", "zeta"]  # known metrics in ORDER, then by name; no step/epoch
    axes = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title() for ax in axes] == drawn and len(fig.axes) == len(drawn)
    lines = {ax.get_title(): ax.lines for ax in axes}
    assert all(len(v) == 1 for v in lines.values())
    np.testing.assert_allclose(lines["loss"][0].get_xydata(), [[1, 2.0], [2, 1.0], [3, 2 / 3], [4, 0.5]])
    np.testing.assert_allclose(lines["knn_top1"][0].get_xydata(), [[2, 0.3], [4, 0.5]])
    with pytest.raises(RelicError, match="no metrics to draw"):
        curves.curves_figure([{"step": 1, "epoch": 0.1}], "empty")


def test_report_draws_each_pretrain_run(tmp_path, cli):
    runs = tmp_path / "runs"
    cfg = PretrainConfig(spec="synthetic", limit_train=32, limit_test=16, arch="resnet18", width=0.25,
                         proj_hidden=32, proj_dim=16, batch_size=16, epochs=2.0, warmup_epochs=0.5,
                         log_every=1, eval_every=2, max_steps=4)
    real = run_pretrain(cfg, workdir=runs, quiet=True)
    fake_run(runs, "other", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
    result = cli("report", runs)
    assert result.code == 0, result.err
    text = (runs / "report.md").read_text()
    for name in (real.name, "other"):
        png = runs / f"report_curves_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in text
    records = curves.read_log(real.path / "metrics.jsonl")
    _, drawn = curves.curves_figure(records, real.name)
    for metric in ("loss", "contrastive", "kl", "lr", "ema_rate", "embedding_std", "knn_top1", "probe_top1"):
        assert metric in drawn
