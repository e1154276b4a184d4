"""`relicv2 analyze neighbors | ratios` and `relicv2 report`: the math on hand-made clusters, the
stages end to end on tiny encoders and data, figures, errors."""

import json
import math
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from relicv2_cli.artifacts import load_artifact, verify_artifact
from relicv2_cli.data import load_dataset
from relicv2_cli.data.synthetic import CLASS_NAMES
from relicv2_cli.errors import RelicError
from relicv2_cli.stages.neighbors import (
    nearest_neighbors,
    neighbor_agreement,
    neighbor_matrix,
    resolve_classes,
    select_anchors,
)
from relicv2_cli.stages.ratios import discriminant_details, discriminant_ratios, summarize
from tests.test_eval_features import make_pretrain

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def clusters(spreads, n=30, dim=8, seed=0, distance=4.0):
    """One Gaussian cluster per class, centres `distance` apart along the axes, std `spreads[c]`."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c, spread in enumerate(spreads):
        centre = np.zeros(dim)
        centre[c] = distance
        xs.append(centre + spread * rng.standard_normal((n, dim)))
        ys.append(np.full(n, c))
    return np.concatenate(xs), np.concatenate(ys)


def brute_force_ratios(x, y):
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    per_class = []
    for c in np.unique(y):
        inside, outside = y == c, y != c
        intra = d[np.ix_(inside, inside)].sum() / (inside.sum() * (inside.sum() - 1))
        per_class.append(d[np.ix_(inside, outside)].mean() / intra)
    per_sample = []
    for i in range(len(y)):
        same = (y == y[i]) & (np.arange(len(y)) != i)
        per_sample.append(d[i, y != y[i]].mean() / d[i, same].mean())
    return np.array(per_class), np.array(per_sample)


# ------------------------------------------------------------------------------------------------
# The math.


def test_ratio_matches_the_formula_and_orders_tight_before_loose():
    x, y = clusters([0.1, 1.5, 0.5], n=25)
    per_class, per_sample = discriminant_ratios(x, y, normalize=False, chunk=7)  # blocks of 7 rows
    ref_class, ref_sample = brute_force_ratios(x, y)
    np.testing.assert_allclose(per_class, ref_class, rtol=1e-9)
    np.testing.assert_allclose(per_sample, ref_sample, rtol=1e-9)
    # tight (0.1) > medium (0.5) > loose (1.5), per class and in the per-image medians
    assert per_class[0] > per_class[2] > per_class[1] > 1
    medians = [np.median(per_sample[y == c]) for c in range(3)]
    assert medians[0] > medians[2] > medians[1]
    # L2 normalisation keeps the order here (clusters on distinct directions) and makes the ratio
    # scale-free: 1000x larger features, same ratios.
    normed, _ = discriminant_ratios(x, y)
    assert normed[0] > normed[2] > normed[1]
    np.testing.assert_allclose(discriminant_ratios(1000 * x, y)[0], normed, rtol=1e-6)
    # Raw features of another width (zero-padded) give the same ratios: widths compare.
    padded = np.concatenate([x, np.zeros((len(x), 120))], axis=1)
    np.testing.assert_allclose(discriminant_ratios(padded, y, normalize=False)[0], per_class, rtol=1e-9)


def test_ratio_edge_cases_do_not_crash():
    # A class with one image: undefined (NaN), the others still computed; its image NaN per-sample.
    x, y = clusters([0.2, 0.2], n=10)
    x = np.concatenate([x, [[0, 0, 9, 0, 0, 0, 0, 0]]])
    y = np.concatenate([y, [2]])
    details = discriminant_details(x, y, normalize=False)
    assert np.isnan(details.per_class[2]) and np.isnan(details.per_sample[-1])
    assert np.isfinite(details.per_class[:2]).all() and details.counts.tolist() == [10, 10, 1]
    stats = summarize(details.per_class)
    assert stats["count"] == 2 and stats["undefined"] == 1 and stats["median"] > 1
    # Ties: a class collapsed onto one point has intra 0 -> +inf; identical everything -> NaN.
    tied = np.array([[1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0], [0, 2.0]])
    per_class, per_sample = discriminant_ratios(tied, np.array([0, 0, 0, 1, 1]), normalize=False)
    assert np.isinf(per_class[0]) and np.isfinite(per_class[1]) and np.isinf(per_sample[:3]).all()
    same = discriminant_ratios(np.ones((4, 3)), np.array([0, 0, 1, 1]))
    assert np.isnan(same[0]).all() and np.isnan(same[1]).all()
    assert summarize(same[0]) == {"count": 0, "undefined": 2, "infinite": 0, "mean": None, "median": None,
                                  "min": None, "max": None}
    # Absent classes (num_classes larger than the labels) are NaN, not errors.
    assert np.isnan(discriminant_ratios(x[:20], y[:20], num_classes=4)[0][2:]).all()


def test_neighbors_agreement_orders_tight_before_loose_and_breaks_ties_by_index():
    x, y = clusters([0.05, 3.0, 3.0], n=20, dim=4, distance=2.0)
    idx, dist = nearest_neighbors(x, x, 5, exclude=np.arange(len(x)), chunk=8)
    assert idx.shape == dist.shape == (60, 5)
    assert (idx != np.arange(60)[:, None]).all()  # never itself
    assert (np.diff(dist, axis=1) >= 0).all()  # sorted by distance
    agreement = neighbor_agreement(y, y[idx])
    assert agreement.per_class[0] == 1.0  # the tight cluster keeps to itself
    assert agreement.per_class[0] > agreement.per_class[1] and agreement.per_class[0] > agreement.per_class[2]
    assert agreement.overall == pytest.approx(np.mean(list(agreement.per_class.values())))
    # Hand-computed: two anchors, neighbors (a, a, b), (b, b, b).
    hand = neighbor_agreement(np.array([0, 1]), np.array([[0, 0, 1], [1, 1, 1]]))
    assert hand.per_class == {0: pytest.approx(2 / 3), 1: 1.0} and hand.overall == pytest.approx(5 / 6)
    # Ties: duplicated points at equal distance come back in index order, the excluded one skipped.
    pool = np.array([[0.0, 0], [1, 0], [1, 0], [1, 0], [5, 5]])
    idx, dist = nearest_neighbors(pool[:1], pool, 3, exclude=np.array([0]))
    assert idx.tolist() == [[1, 2, 3]] and np.allclose(dist, 1)
    matrix = neighbor_matrix(idx, dist, 5)
    assert np.isnan(matrix[0, [0, 4]]).all() and np.allclose(matrix[0, 1:4], 1)
    with pytest.raises(RelicError, match="pool has 4 candidate"):
        nearest_neighbors(pool[:1], pool, 5, exclude=np.array([0]))


def test_class_choice_and_anchor_selection():
    assert [CIFAR10[i] for i in resolve_classes(CIFAR10, None)] == ["cat", "dog", "automobile", "truck"]
    assert resolve_classes(["a", "b", "c", "d", "e"], None) == [0, 1, 2, 3]  # no look-alikes: first four
    assert resolve_classes(["a", "b"], None) == [0, 1]
    assert resolve_classes(CIFAR10, "Ship, airplane") == [8, 0]
    with pytest.raises(RelicError, match="unknown class 'cow'.*valid classes: airplane, automobile"):
        resolve_classes(CIFAR10, "cat,cow")
    with pytest.raises(RelicError, match="at least 2 classes"):
        resolve_classes(CIFAR10, "cat")
    with pytest.raises(RelicError, match="twice"):
        resolve_classes(CIFAR10, "cat,cat")
    with pytest.raises(RelicError, match="at least 2"):
        resolve_classes(["only"], None)
    labels = np.array([1, 0, 1, 2, 1, 0, 1])
    anchors, available = select_anchors(labels, [1, 0], 3)
    assert anchors.tolist() == [0, 2, 4, 1, 5] and available == {1: 4, 0: 2}
    with pytest.raises(RelicError, match="class 'd' has no image in the test split"):
        select_anchors(labels, [0, 3], 3, ["a", "b", "c", "d"])


# ------------------------------------------------------------------------------------------------
# The stages through the CLI.

SMALL = ["--limit-train", "120", "--limit-test", "80", "--image-size", "16", "--device", "cpu"]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_neighbors_ratios_report_end_to_end(tmp_path, cli):
    pre = make_pretrain(tmp_path)  # ResNet-18 width 0.25: 128-d features
    encoders = [pre.path, "random:resnet18"]  # random at --width 0.5: 256-d features
    common = [*encoders, "synthetic", *SMALL, "--width", "0.5", "--workdir", tmp_path]

    result = cli("analyze", "neighbors", *common, "--per-class", "12", "--k", "3")
    assert result.code == 0, result.err
    art = load_artifact(result.last_line, kind="neighbors")
    assert art.name == "tiny-relicv2+random-resnet18-synthetic"
    assert "capped to" in result.err  # 80 test images: fewer than 12 of some class
    m = art.metrics
    assert m["classes"] == ["circle", "ring", "star", "cross"] and m["k"] == 3 and m["pool"] == "selected"
    assert set(m["encoders"]) == {"pretrain/tiny (relicv2)", "random:resnet18"}
    dims = {label: e["feature_dim"] for label, e in m["encoders"].items()}
    assert dims == {"pretrain/tiny (relicv2)": 128, "random:resnet18": 256}
    for e in m["encoders"].values():
        assert 0 <= e["agreement"] <= 1 and 0 <= e["knn_top1"] <= 1
        assert set(e["agreement_per_class"]) == set(m["classes"])
    assert {p["kind"] for p in art.manifest["parents"]} == {"features"} and len(art.manifest["parents"]) == 4
    numbers = json.loads((art.path / "neighbors.json").read_text())
    counts = m["anchors_per_class"]
    assert len(numbers["anchors"]) == sum(counts.values()) and all(0 < n <= 12 for n in counts.values())
    assert np.array(numbers["encoders"][0]["neighbours"]).shape == (len(numbers["anchors"]), 3)
    assert png_size(art.path / "neighbors.png") == (1430, 728)  # two panels side by side
    assert (art.path / "neighbors.svg").read_text().lstrip().startswith("<?xml")
    assert verify_artifact(art.path) == []
    assert "kNN top-1" in result.err and "overall" in result.err

    result = cli("analyze", "ratios", *common, "--quiet", "--distance-batch", "16")
    assert result.code == 0, result.err
    assert result.out.strip() == str(tmp_path / "ratios" / "tiny-relicv2+random-resnet18-synthetic")
    ratios = load_artifact(result.last_line, kind="ratios")
    for label, e in ratios.metrics["encoders"].items():
        assert e["ratio_median"] > 0 and e["ratio_mean"] > 0 and e["feature_dim"] == dims[label]
    with h5py.File(ratios.path / "ratios.h5") as f:
        assert f["encoder_1"].attrs["label"] == "random:resnet18"
        assert f["encoder_1/per_sample"].shape == (80,) and f["encoder_1/per_class"].shape == (10,)
    assert png_size(ratios.path / "ratios.png") == (1430, 1170)
    # Features were cached by neighbors and reused: still two encoders x (train, test).
    assert len(list((tmp_path / "features").iterdir())) == 4

    result = cli("report", tmp_path)
    assert result.code == 0, result.err
    report = Path(result.last_line)
    text = report.read_text()
    assert report == tmp_path / "report.md"
    for heading in ("## pretrain (1)", "## features (4)", "## neighbors (1)", "## ratios (1)", "## Summary"):
        assert heading in text
    assert "pretrain/tiny: relicv2, resnet18 w0.25" in text
    assert "random init (resnet18, width 0.5, seed 0)" in text
    figure = "tiny-relicv2+random-resnet18-synthetic"
    assert f"![{figure}](neighbors/{figure}/neighbors.png)" in text
    assert png_size(tmp_path / "report_summary.png")[0] > 500


def test_analyze_errors_write_nothing(tmp_path, cli):
    base = ["random:resnet18", "synthetic", *SMALL, "--width", "0.25", "--workdir", tmp_path]
    cases = [
        (("analyze", "neighbors", *base, "--classes", "circle,cow"),
         "unknown class 'cow' in --classes; valid classes: circle, square"),
        (("analyze", "neighbors", *base, "--classes", "circle"), "at least 2 classes"),
        (("analyze", "neighbors", *base, "--pool", "train"), "--pool must be one of selected, test"),
        (("analyze", "neighbors", *base, "--k", "0"), "--k must be at least 1"),
        (("analyze", "ratios", "random:resnet18", "random:resnet34", "--workdir", tmp_path),
         "the last argument must be a dataset SPEC"),
        (("analyze", "ratios", "synthetic", "--workdir", tmp_path),
         "one or more ENCODERs and then a dataset SPEC"),
        (("analyze", "ratios", "random:resnet18", "random:resnet18", "synthetic", "--workdir", tmp_path),
         "listed twice"),
        (("analyze", "ratios", tmp_path / "nope", "synthetic", "--workdir", tmp_path), "unknown encoder"),
        (("analyze", "ratios", *base, "--distance-batch", "0"), "--distance-batch must be at least 1"),
        (("analyze", "ratios", *base[:2], "--limit-train", "20", "--limit-test", "1", "--image-size", "16",
          "--workdir", tmp_path), "the test split holds 1 class(es); the ratio needs at least 2"),
        (("report", tmp_path / "missing"), "no artifact folder"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.code == 2, (args, result.err)
        assert message in result.err and len(result.err.strip().splitlines()) == 1, (args, result.err)
    assert not any((tmp_path / kind).exists() for kind in ("neighbors", "ratios", "features"))
    # An existing artifact is not replaced without --force.
    ok = cli("analyze", "ratios", *base, "--name", "r", "--quiet")
    assert ok.code == 0, ok.err
    again = cli("analyze", "ratios", *base, "--name", "r")
    assert again.code == 2 and "artifact exists" in again.err


def test_pool_test_and_single_image_class(tmp_path, cli):
    """--pool test searches the whole split; a class with one test image and k above the pool are
    handled with notes, not crashes."""
    args = ["random:resnet18", "synthetic", "--limit-train", "60", "--limit-test", "12", "--image-size", "16",
            "--width", "0.25", "--device", "cpu", "--workdir", tmp_path, "--no-knn"]
    labels = load_dataset("synthetic", limit_train=60, limit_test=12, image_size=16).test.labels
    single = [c for c in np.unique(labels) if (labels == c).sum() == 1]
    pair = [c for c in np.unique(labels) if (labels == c).sum() >= 2]
    assert single and pair, labels  # the fixture needs both kinds of classes
    classes = f"{CLASS_NAMES[single[0]]},{CLASS_NAMES[pair[0]]}"
    result = cli("analyze", "neighbors", *args, "--classes", classes, "--pool", "test", "--k", "20")
    assert result.code == 0, result.err
    art = load_artifact(result.last_line)
    assert art.metrics["k"] == 11 and "capped to 11" in result.err  # 12 test images, minus the anchor
    assert art.metrics["encoders"]["random:resnet18"]["knn_top1"] is None
    assert png_size(art.path / "neighbors.png") == (702, 962)
    result = cli("analyze", "neighbors", *args, "--classes", classes, "--name", "sel", "--quiet")
    assert result.code == 0, result.err
    sel = load_artifact(result.last_line)
    assert sel.metrics["k"] == len(json.loads((sel.path / "neighbors.json").read_text())["anchors"]) - 1


def test_weighted_knn_votes_by_hand_and_chunks_bounded_by_memory(monkeypatch):
    from relicv2_cli import knn

    train = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[2.0, 1.0]])
    scores = knn.weighted_knn_predict(train, labels, test, num_classes=2, k=2, temperature=0.5)
    # cosines to the test point: 2/sqrt5, 1/sqrt5, 3/sqrt10, -2/sqrt5; the two nearest are rows 0 and 2
    expected = torch.tensor([[math.exp(2 / math.sqrt(5) / 0.5), math.exp(3 / math.sqrt(10) / 0.5)]])
    assert torch.allclose(scores.double(), expected.double(), rtol=1e-5)

    generator = torch.Generator().manual_seed(0)
    train = torch.randn(500, 8, generator=generator)
    test = torch.randn(300, 8, generator=generator)
    labels = torch.randint(0, 5, (500,), generator=generator)
    whole = knn.weighted_knn_predict(train, labels, test, num_classes=5)
    seen = []
    real_normalize = knn.F.normalize
    monkeypatch.setattr(knn, "SIM_BLOCK", 500 * 7)  # 7 test rows per chunk against 500 training rows
    monkeypatch.setattr(knn.F, "normalize", lambda x, dim: seen.append(len(x)) or real_normalize(x, dim=dim))
    chunked = knn.weighted_knn_predict(train, labels, test, num_classes=5)
    assert max(seen[1:]) == 7 and torch.equal(chunked, whole)
