import itertools
import math

import pytest
import torch

from relicv2_cli.losses import byol_loss, embedding_std, multicrop_loss, relic_loss, sample_negatives


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(u, v):
    return sum(x * y for x, y in zip(u, v, strict=True))


def reference_relic(
    online, target, negatives, tau, alpha, beta, online_pool=None, target_pool=None, offset=0, swapped=None
):
    """docs/method.md's loss with plain Python floats, one anchor at a time. swapped = (online of the
    target's view, target of the online's view): q from the two views exchanged."""
    a = [_unit(r) for r in online.tolist()]
    b = [_unit(r) for r in target.tolist()]
    a_pool = [_unit(r) for r in (online_pool if online_pool is not None else online).tolist()]
    b_pool = [_unit(r) for r in (target_pool if target_pool is not None else target).tolist()]
    total_c = total_kl = 0.0
    for i, negs in enumerate(negatives.tolist()):
        # candidate 0 is the positive (local row i), then the sampled negatives
        s = [_dot(a[i], b[i]) / tau] + [_dot(a[i], b_pool[j]) / tau for j in negs]
        if swapped is None:
            t = [_dot(b[i], a[i]) / tau] + [_dot(b[i], a_pool[j]) / tau for j in negs]
        else:
            a2 = _unit(swapped[0][i].tolist())
            b2 = [_unit(r) for r in swapped[1].tolist()]
            t = [_dot(a2, b2[offset + i]) / tau] + [_dot(a2, b2[j]) / tau for j in negs]
        zp = sum(math.exp(x) for x in s)
        zq = sum(math.exp(x) for x in t)
        p = [math.exp(x) / zp for x in s]
        q = [math.exp(x) / zq for x in t]
        total_c += -math.log(p[0])
        total_kl += sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q, strict=True))
    n = len(negatives)
    return (alpha * total_c + beta * total_kl) / n, total_c / n, total_kl / n


def test_relic_loss_matches_hand_computation():
    torch.manual_seed(0)
    online, target = torch.randn(4, 3), torch.randn(4, 3)
    loss, stats = relic_loss(
        online,
        target,
        n_negatives=2,
        tau=0.2,
        alpha=0.7,
        beta=1.3,
        generator=torch.Generator().manual_seed(5),
    )
    negatives = sample_negatives(4, 2, torch.Generator().manual_seed(5), "cpu")
    ref, ref_c, ref_kl = reference_relic(online, target, negatives, 0.2, 0.7, 1.3)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert stats["contrastive"].item() == pytest.approx(ref_c, rel=1e-5)
    assert stats["kl"].item() == pytest.approx(ref_kl, rel=1e-5)
    assert ref_kl > 0 and ref_c > 0


def test_relic_loss_tiny_by_hand():
    # B=2, one negative (the other row): everything can be written down.
    online = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    tau = 0.5
    r = 1 / math.sqrt(2)

    # anchor 0: s = [<a0,b0>, <a0,b1>]/tau = [r, 0]/tau;  t = [<b0,a0>, <b0,a1>]/tau = [r, r]/tau
    # anchor 1: s = [<a1,b1>, <a1,b0>]/tau = [1, r]/tau;  t = [<b1,a1>, <b1,a0>]/tau = [1, 0]/tau
    def softmax(xs):
        z = sum(math.exp(x / tau) for x in xs)
        return [math.exp(x / tau) / z for x in xs]

    p0, q0 = softmax([r, 0]), softmax([r, r])
    p1, q1 = softmax([1, r]), softmax([1, 0])
    c = (-math.log(p0[0]) - math.log(p1[0])) / 2
    kl = (
        sum(sum(p * math.log(p / q) for p, q in zip(ps, qs, strict=True)) for ps, qs in [(p0, q0), (p1, q1)])
        / 2
    )
    loss, stats = relic_loss(online, target, n_negatives=1, tau=tau)
    assert stats["contrastive"].item() == pytest.approx(c, rel=1e-5)
    assert stats["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(c + kl, rel=1e-5)


def test_relic_loss_no_negatives_is_zero():
    online, target = torch.randn(5, 4), torch.randn(5, 4)
    loss, stats = relic_loss(online, target, n_negatives=0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert stats["contrastive"].item() == pytest.approx(0.0, abs=1e-7)
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-7)


def test_relic_loss_identical_views_have_zero_kl():
    z = torch.randn(6, 8)
    loss, stats = relic_loss(z, z.clone(), n_negatives=5)
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["contrastive"].item() > 0
    assert loss.item() == pytest.approx(stats["contrastive"].item(), rel=1e-5)


def test_relic_loss_is_scale_invariant():
    online, target = torch.randn(6, 8), torch.randn(6, 8)
    l1, _ = relic_loss(online, target, generator=torch.Generator().manual_seed(1))
    l2, _ = relic_loss(3 * online, 0.5 * target, generator=torch.Generator().manual_seed(1))
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5)


def test_relic_loss_stop_gradient():
    online = torch.randn(6, 8, requires_grad=True)
    target = torch.randn(6, 8, requires_grad=True)
    loss, stats = relic_loss(online, target, n_negatives=3, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert target.grad is None
    assert online.grad is not None and online.grad.abs().sum() > 0
    assert not stats["kl"].requires_grad and not stats["contrastive"].requires_grad


def test_relic_kl_gradient_flows_only_through_p():
    torch.manual_seed(1)
    online = torch.randn(4, 3, requires_grad=True)
    target = torch.randn(4, 3)
    tau = 0.3
    loss, _ = relic_loss(online, target, n_negatives=3, tau=tau, alpha=0.0, beta=1.0)  # all others
    (grad,) = torch.autograd.grad(loss, online)

    def kl_with(q_source):
        a = torch.nn.functional.normalize(online, dim=1)
        aq = torch.nn.functional.normalize(q_source, dim=1)
        b = torch.nn.functional.normalize(target, dim=1)
        log_p = torch.log_softmax(a @ b.T / tau, dim=1)  # candidates = the whole batch here
        log_q = torch.log_softmax(b @ aq.T / tau, dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(1).mean()

    (grad_p_only,) = torch.autograd.grad(kl_with(online.detach()), online)
    (grad_both,) = torch.autograd.grad(kl_with(online), online)
    torch.testing.assert_close(grad, grad_p_only)
    assert not torch.allclose(grad, grad_both, atol=1e-4)


def test_relic_loss_with_global_pool_and_offset():
    torch.manual_seed(2)
    online_g, target_g = torch.randn(8, 5), torch.randn(8, 5)
    online, target = online_g[4:7], target_g[4:7]  # this rank's anchors sit at 4..6
    loss, stats = relic_loss(
        online,
        target,
        n_negatives=4,
        generator=torch.Generator().manual_seed(3),
        target_pool=target_g,
        online_pool=online_g,
        offset=4,
    )
    negatives = sample_negatives(3, 4, torch.Generator().manual_seed(3), "cpu", offset=4, pool=8)
    ref, ref_c, ref_kl = reference_relic(online, target, negatives, 0.2, 1.0, 1.0, online_g, target_g)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert stats["kl"].item() == pytest.approx(ref_kl, rel=1e-5)
    # With every other row as a negative, the result equals the full-batch loss restricted to 4..6.
    full, _ = relic_loss(
        online, target, n_negatives=100, target_pool=target_g, online_pool=online_g, offset=4
    )
    ref_full, _, _ = reference_relic(
        online,
        target,
        torch.tensor([[j for j in range(8) if j != 4 + i] for i in range(3)]),
        0.2,
        1.0,
        1.0,
        online_g,
        target_g,
    )
    assert full.item() == pytest.approx(ref_full, rel=1e-5)


def test_relic_loss_swapped_views_kl_matches_hand_computation():
    # --kl-form swapped-views: q is online(view of the target) against target(view of the online).
    torch.manual_seed(1)
    online, target = torch.randn(5, 3), torch.randn(5, 3)
    online_other, target_other = torch.randn(5, 3), torch.randn(5, 3)
    loss, stats = relic_loss(online, target, n_negatives=3, tau=0.3, alpha=1.0, beta=1.0,
                             generator=torch.Generator().manual_seed(2), swapped=(online_other, target_other))
    negatives = sample_negatives(5, 3, torch.Generator().manual_seed(2), "cpu")
    ref, ref_c, ref_kl = reference_relic(online, target, negatives, 0.3, 1.0, 1.0,
                                         swapped=(online_other, target_other))
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert stats["kl"].item() == pytest.approx(ref_kl, rel=1e-5)
    default, default_stats = relic_loss(online, target, n_negatives=3, tau=0.3,
                                        generator=torch.Generator().manual_seed(2))
    assert default_stats["contrastive"].item() == pytest.approx(ref_c, rel=1e-5)  # same p, other q
    assert abs(default_stats["kl"].item() - ref_kl) > 1e-3
    # A pair of one view with itself (i == j, kept by RELICv2) is its own swap: q = p, no KL.
    same, same_stats = relic_loss(online, target, n_negatives=3, tau=0.3,
                                  generator=torch.Generator().manual_seed(2), swapped=(online, target))
    assert same_stats["kl"].item() == pytest.approx(0.0, abs=1e-6)
    # Pools: the swapped target comes from the same global pool rows as the candidates.
    pool_t, pool_o, pool_swapped = torch.randn(9, 3), torch.randn(9, 3), torch.randn(9, 3)
    pooled, _ = relic_loss(online, target, n_negatives=3, tau=0.3, target_pool=pool_t, online_pool=pool_o,
                           offset=4, generator=torch.Generator().manual_seed(2),
                           swapped=(online_other, pool_swapped))
    negatives = sample_negatives(5, 3, torch.Generator().manual_seed(2), "cpu", offset=4, pool=9)
    ref_pooled = reference_relic(online, target, negatives, 0.3, 1.0, 1.0, online_pool=pool_o,
                                 target_pool=pool_t, offset=4, swapped=(online_other, pool_swapped))
    assert pooled.item() == pytest.approx(ref_pooled[0], rel=1e-5)


def test_sample_negatives_basic_properties():
    g = torch.Generator().manual_seed(0)
    negs = sample_negatives(16, 10, g, "cpu")
    assert negs.shape == (16, 10) and negs.dtype == torch.long
    for i, row in enumerate(negs.tolist()):
        assert i not in row
        assert len(set(row)) == 10
        assert all(0 <= j < 16 for j in row)


def test_sample_negatives_all_others_when_too_many():
    negs = sample_negatives(5, 50, torch.Generator().manual_seed(0), "cpu")
    assert negs.shape == (5, 4)
    for i, row in enumerate(negs.tolist()):
        assert sorted(row) == [j for j in range(5) if j != i]
    assert sample_negatives(5, 0, None, "cpu").shape == (5, 0)
    assert sample_negatives(1, 3, None, "cpu").shape == (1, 0)


def test_sample_negatives_offset_and_pool():
    negs = sample_negatives(4, 11, torch.Generator().manual_seed(0), "cpu", offset=4, pool=12)
    assert negs.shape == (4, 11)
    for i, row in enumerate(negs.tolist()):
        assert sorted(row) == [j for j in range(12) if j != 4 + i]
    negs = sample_negatives(4, 3, torch.Generator().manual_seed(0), "cpu", offset=8, pool=12)
    assert all(8 + i not in row for i, row in enumerate(negs.tolist()))
    assert negs.max() < 12 and negs.min() >= 0


def test_sample_negatives_uniform_and_reproducible():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(10, 10)
    for _ in range(300):
        negs = sample_negatives(10, 3, g, "cpu")
        counts.scatter_add_(1, negs, torch.ones(10, 3))
    assert torch.all(counts.diagonal() == 0)
    off_diag = counts[~torch.eye(10, dtype=torch.bool)]
    expected = 300 * 3 / 9
    assert off_diag.min() > 0.7 * expected and off_diag.max() < 1.3 * expected
    a = sample_negatives(10, 3, torch.Generator().manual_seed(7), "cpu")
    b = sample_negatives(10, 3, torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(a, b)


def test_sample_negatives_draws_every_subset_equally_often():
    # Uniform without replacement means every n-subset of the other rows is equally likely, not only
    # every single index: pool 6, n 2 -> C(5, 2) = 10 subsets per anchor, each with probability 1/10.
    g = torch.Generator().manual_seed(1)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(400):
        for row in sample_negatives(6, 2, g, "cpu")[2:3].tolist():  # anchor 2
            key = tuple(sorted(row))
            counts[key] = counts.get(key, 0) + 1
    assert sorted(counts) == [s for s in itertools.combinations(range(6), 2) if 2 not in s]
    assert min(counts.values()) > 0.6 * 40 and max(counts.values()) < 1.4 * 40


def test_sample_negatives_global_rows_are_rows_of_the_whole_batch_draw():
    whole = sample_negatives(12, 5, torch.Generator().manual_seed(7), "cpu")
    for rank in range(3):
        part = sample_negatives(4, 5, torch.Generator().manual_seed(7), "cpu", offset=4 * rank, pool=12,
                                global_rows=True)
        assert torch.equal(part, whole[4 * rank : 4 * rank + 4])


def test_byol_loss_values():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[0.0, 3.0], [2.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = byol_loss(p, z)
    expected = (2.0 + 0.0 + (2 - 2 / math.sqrt(2))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert z.grad is None and p.grad is not None


def _recording_pair_fn(calls):
    def fn(online, target):
        calls.append((online.item(), target.item()))
        value = torch.tensor(10 * online.item() + target.item())
        return value, {"value": value}

    return fn


@pytest.mark.parametrize("include_same_view,n_pairs", [(True, 8), (False, 6)])
def test_multicrop_loss_pairs(include_same_view, n_pairs):
    large = [torch.tensor(1.0), torch.tensor(2.0)]
    small = [torch.tensor(3.0), torch.tensor(4.0)]
    target = [torch.tensor(1.0), torch.tensor(2.0)]
    calls = []
    loss, stats = multicrop_loss(_recording_pair_fn(calls), large, small, target, include_same_view)
    assert len(calls) == n_pairs
    expected = {(o, t) for o in (1.0, 2.0, 3.0, 4.0) for t in (1.0, 2.0)}
    if not include_same_view:
        expected -= {(1.0, 1.0), (2.0, 2.0)}  # BYOL: L*(L-1) + S*L pairs
    assert set(calls) == expected and len(set(calls)) == n_pairs
    mean = sum(10 * o + t for o, t in calls) / n_pairs  # each pair weighs 1 / n_pairs
    assert loss.item() == pytest.approx(mean)
    assert stats["value"].item() == pytest.approx(mean)


def test_multicrop_with_relic_loss_backward():
    torch.manual_seed(0)
    online = [torch.randn(6, 4, requires_grad=True) for _ in range(3)]
    target = [torch.randn(6, 4) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    loss, stats = multicrop_loss(
        lambda o, t: relic_loss(o, t, n_negatives=3, generator=g), online[:2], online[2:], target, True
    )
    loss.backward()
    assert all(o.grad is not None for o in online)
    assert set(stats) == {"contrastive", "kl"}


def test_embedding_std():
    z = torch.randn(4096, 64)
    assert embedding_std(z) == pytest.approx(1 / math.sqrt(64), rel=0.05)
    collapsed = torch.ones(32, 64) * torch.randn(1, 64)
    assert embedding_std(collapsed) == pytest.approx(0.0, abs=1e-6)
    assert isinstance(embedding_std(z), float)
