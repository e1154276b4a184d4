"""The linear solver (pure functions) and label subsets: no encoder involved."""

import numpy as np
import pytest

from relicv2_cli import probe
from relicv2_cli.data.subsets import balanced_subset, load_subset_file, subset_digest, write_subset_file
from relicv2_cli.errors import RelicError
from relicv2_cli.probe import (
    fit_logistic,
    holdout_split,
    linear_probe,
    parse_l2_grid,
    score,
    select_l2,
)


def blobs(n_per_class, num_classes=4, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).normal(size=(num_classes, dim)) * 3
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = means[y] + spread * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y


def test_separable_toy_problem_reaches_100_percent():
    x, y = blobs(100)
    xt, yt = blobs(50, seed=1)
    result = linear_probe(x, y, xt, yt, num_classes=4, grid=parse_l2_grid("1e-4:1:5"), seed=0)
    assert result.test["top1"] == 1.0 and result.test["top5"] == 1.0
    assert result.train["top1"] == 1.0
    assert result.test["per_class"] == [1.0] * 4
    # The classifier applies the standardisation itself: raw features in, same predictions out.
    assert (result.model.logits(xt).argmax(1).numpy() == yt).all()


def test_fit_logistic_matches_the_objective_optimum():
    x, y = blobs(30, spread=2.0)
    model = fit_logistic(x, y, 0.1, num_classes=4)
    # At the optimum the gradient vanishes: W (standardised space) = -(1/l2) dCE/dW.
    import torch

    z = (torch.from_numpy(x) - model.mean) / model.std
    w_std = (model.weight * model.std).requires_grad_(True)
    b_std = (model.bias + model.weight @ model.mean).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(z @ w_std.T + b_std,
                                             torch.from_numpy(y)) + 0.05 * (w_std**2).sum()
    loss.backward()
    assert w_std.grad.abs().max() < 1e-4 and b_std.grad.abs().max() < 1e-4
    assert model.iterations > 0


def correlated_problem(n_per_class, label_noise, seed, dim=100, num_classes=5):
    """Weak class signal in correlated features; a fraction of labels replaced at random."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(123).normal(size=(num_classes, dim)) * 0.25
    mix = np.eye(dim) + 2 * np.random.default_rng(7).normal(size=(dim, dim)) / np.sqrt(dim)
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = (means[y] + rng.normal(size=(len(y), dim))) @ mix
    y = np.where(rng.random(len(y)) < label_noise, rng.integers(0, num_classes, len(y)), y)
    return x.astype(np.float32), y


def test_l2_grid_picks_a_larger_penalty_for_a_tiny_noisy_training_set():
    grid = parse_l2_grid("1e-4:10:11")

    def chosen(n_per_class, noise, seed):
        x, y = correlated_problem(n_per_class, noise, seed)
        fit, val = holdout_split(y, 0.3, seed)
        best, rows = select_l2(x[fit], y[fit], x[val], y[val], grid, num_classes=5)
        assert [r["l2"] for r in rows] == grid
        return best

    large = chosen(300, 0.0, 0)
    tiny = [chosen(10, 0.3, seed) for seed in range(3)]  # tiny validation sets are noisy: take the median
    assert large <= 1e-2
    assert np.median(tiny) >= 100 * large


def test_holdout_split_is_stratified_and_disjoint():
    y = np.repeat(np.arange(3), [10, 20, 2])
    fit, val = holdout_split(y, 0.2, seed=0)
    assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == len(y)
    assert np.bincount(y[val], minlength=3).tolist() == [2, 4, 1]
    assert np.array_equal(val, holdout_split(y, 0.2, seed=0)[1])


def test_linear_probe_refits_on_train_plus_val(monkeypatch):
    x, y = blobs(20)
    xv, yv = blobs(10, seed=2)
    sizes = []
    real = probe.fit_logistic

    def spy(features, labels, l2, **kw):
        sizes.append(len(features))
        return real(features, labels, l2, **kw)

    monkeypatch.setattr(probe, "fit_logistic", spy)
    linear_probe(x, y, xv, yv, num_classes=4, grid=[1e-3, 1e-1], val_x=xv, val_y=yv)
    assert sizes == [80, 80, 120]  # one fit per grid value on train, then the refit on train + val
    sizes.clear()
    linear_probe(x, y, xv, yv, num_classes=4, grid=[1e-3, 1e-1], val_fraction=0.25)
    assert sizes == [60, 60, 80]  # carved: fit on 75% of train, refit on all of it


def test_score_and_grid_parsing():
    import torch

    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 3, 2, 1, -1, -2], [0, 1, 2, 3, 4, 5]])
    result = score(logits, np.array([1, 1, 0]))
    assert result["top1"] == pytest.approx(1 / 3) and result["top5"] == pytest.approx(2 / 3)
    assert result["per_class"][:2] == [0.0, 0.5] and result["per_class"][2] is None
    assert result["mean_per_class"] == 0.25  # mean over the classes present in the labels
    assert parse_l2_grid("1e-2:1:3") == pytest.approx([1e-2, 1e-1, 1.0])
    assert parse_l2_grid("0.5,0.1") == [0.1, 0.5]
    for bad in ("1:2", "-1:1:3", "a,b", "1e-3:1:0"):
        with pytest.raises(RelicError, match="--l2-grid"):
            parse_l2_grid(bad)


def test_balanced_subset_is_class_balanced_and_deterministic():
    labels = np.repeat(np.arange(4), [100, 200, 50, 7])
    idx = balanced_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[idx]).tolist() == [10, 20, 5, 1]  # round(0.1 * 7) = 1
    assert np.array_equal(idx, balanced_subset(labels, 0.1, seed=3)) and np.all(np.diff(idx) > 0)
    assert not np.array_equal(idx, balanced_subset(labels, 0.1, seed=4))
    assert np.bincount(labels[balanced_subset(labels, 0.001, seed=0)]).tolist() == [1, 1, 1, 1]
    assert len(balanced_subset(labels, 1.0, seed=0)) == len(labels)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(RelicError, match="--fraction must be in"):
            balanced_subset(labels, bad, seed=0)
    with pytest.raises(RelicError, match=r"leave 1 class\(es\) empty \(dog\)"):
        balanced_subset(np.array([0, 0, 2, 2]), 0.5, 0, num_classes=3, class_names=["cat", "dog", "owl"])


def test_subset_files(tmp_path):
    idx = np.array([5, 1, 9])
    write_subset_file(tmp_path / "s.txt", np.sort(idx))
    assert load_subset_file(tmp_path / "s.txt", 10).tolist() == [1, 5, 9]
    np.save(tmp_path / "s.npy", idx)
    assert load_subset_file(tmp_path / "s.npy", 10).tolist() == [1, 5, 9]
    assert subset_digest(idx) == subset_digest(np.array([1, 5, 9]))
    (tmp_path / "c.txt").write_text("# SimCLR-style list\n3\n\n4  # comment\n")
    assert load_subset_file(tmp_path / "c.txt", 5).tolist() == [3, 4]
    cases = {"1\n10\n": "out of range", "1\n2\n1\n": "duplicate", "1\nx\n": "not an integer",
             "\n": "no index",
             "-1\n": "out of range"}
    for text, message in cases.items():
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(RelicError, match=message):
            load_subset_file(tmp_path / "bad.txt", 10)
    np.save(tmp_path / "f.npy", np.array([0.5]))
    with pytest.raises(RelicError, match="integer array"):
        load_subset_file(tmp_path / "f.npy", 10)
    with pytest.raises(RelicError, match="not found"):
        load_subset_file(tmp_path / "missing.txt", 10)
