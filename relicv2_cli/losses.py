"""RELICv2 and BYOL losses as pure functions (method.md sections 1-2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Stats = dict[str, torch.Tensor]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 activations upcast to fp32 for the loss; fp64 (the exactness-check precision) kept."""
    return x if x.dtype == torch.float64 else x.float()


def sample_negatives(
    batch: int,
    n_negatives: int,
    generator: torch.Generator | None,
    device: torch.device | str,
    offset: int = 0,
    pool: int | None = None,
    global_rows: bool = False,
) -> torch.Tensor:
    """(batch, n) indices into range(pool); row i holds n distinct indices, none equal to offset + i.

    pool defaults to batch. With several processes pool is the all-gathered global batch and this
    rank's anchors sit at offset..offset+batch. n = min(n_negatives, pool - 1): all others when
    n_negatives asks for more. Uniform without replacement, in O(batch * n): Floyd's algorithm picks a
    uniform n-subset of the pool - 1 other rows, then indices at or past the positive shift up by one.
    global_rows: draw for every anchor of the pool and keep rows offset..offset+batch, so that each
    process picks exactly the negatives one process holding the whole batch would pick from the same
    generator (costs pool * n draws instead of batch * n).
    """
    pool = batch if pool is None else pool
    others = pool - 1
    n = max(0, min(n_negatives, others))
    if n == 0:
        return torch.empty(batch, 0, dtype=torch.long, device=device)
    rows = pool if global_rows else batch
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    gen_device = generator.device if generator is not None else torch.device(device)
    # float64 uniforms: floor(u * (j + 1)) is then uniform on 0..j to ~1e-12 even for huge pools.
    uniforms = torch.rand(rows, n, generator=generator, device=gen_device, dtype=torch.float64)
    chosen = torch.empty(rows, n, dtype=torch.long, device=gen_device)
    for i, j in enumerate(range(others - n, others)):  # Floyd: step i adds one new index in 0..j
        t = (uniforms[:, i] * (j + 1)).long().clamp_(max=j)
        taken = (chosen[:, :i] == t[:, None]).any(1)
        chosen[:, i] = torch.where(taken, j, t)
    if global_rows:
        chosen = chosen[offset : offset + batch]
    chosen = chosen.to(device)
    anchor = torch.arange(batch, device=device)[:, None] + offset
    return chosen + (chosen >= anchor)  # skip the positive: 0..pool-2 -> 0..pool-1 without offset + i


def relic_loss(
    online: torch.Tensor,
    target: torch.Tensor,
    n_negatives: int = 10,
    tau: float = 0.2,
    alpha: float = 1.0,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    target_pool: torch.Tensor | None = None,
    online_pool: torch.Tensor | None = None,
    offset: int = 0,
    global_rows: bool = False,
    swapped: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Stats]:
    """RELICv2 loss l(online, target, n_e), docs/method.md.

    online a (B, D) and target b (B, D) are L2-normalised here. For anchor i the candidates are
    C_i = {i} + N_i (positive first), N_i = n_negatives random other rows of the target pool.
    p_i = softmax_j <a_i, b_j>/tau, q_i = softmax_j <b_i, a_j>/tau (roles swapped, stop-gradient).
    loss = mean_i [alpha * (-log p_i[positive]) + beta * KL(p_i || q_i)].
    target_pool / online_pool: all-gathered (global) embeddings to draw candidates from; this
    rank's rows sit at offset..offset+B. Default: the local tensors. global_rows: see sample_negatives.
    swapped = (online', target'): the second reading of q (RELIC's, `--kl-form swapped-views`): the two
    views exchanged, q_i = softmax_j <a'_i, b'_j>/tau over the same candidates, where a' (B, D) is the
    online embedding of the target's view and b' (pool, D) the target embedding of the online's view.
    """
    # fp32 for the softmax whatever the autocast dtype; the target never gets a gradient.
    a = F.normalize(at_least_fp32(online), dim=1)
    b = F.normalize(at_least_fp32(target.detach()), dim=1)
    b_pool = b if target_pool is None else F.normalize(at_least_fp32(target_pool.detach()), dim=1)
    a_pool = a.detach() if online_pool is None else F.normalize(at_least_fp32(online_pool.detach()), dim=1)
    if a_pool.shape != b_pool.shape:
        raise ValueError(f"online_pool {tuple(a_pool.shape)} and target_pool {tuple(b_pool.shape)} differ")

    neg = sample_negatives(a.shape[0], n_negatives, generator, a.device, offset, b_pool.shape[0], global_rows)
    pos = (a * b).sum(1, keepdim=True) / tau  # <a_i, b_i>: shared by p and q
    logits_p = torch.cat([pos, torch.einsum("bd,bkd->bk", a, b_pool[neg]) / tau], dim=1)
    if swapped is None:  # target anchor b_i against the online embeddings of the same candidates
        q_anchor, q_pool, q_pos = b, a_pool, pos.detach()
    else:
        q_anchor = F.normalize(at_least_fp32(swapped[0].detach()), dim=1)
        q_pool = F.normalize(at_least_fp32(swapped[1].detach()), dim=1)
        if q_pool.shape != b_pool.shape:
            raise ValueError(f"swapped target {tuple(q_pool.shape)} and target_pool "
                             f"{tuple(b_pool.shape)} differ")
        rows = torch.arange(a.shape[0], device=a.device) + offset
        q_pos = (q_anchor * q_pool[rows]).sum(1, keepdim=True) / tau
    logits_q = torch.cat([q_pos, torch.einsum("bd,bkd->bk", q_anchor, q_pool[neg]) / tau], dim=1)

    log_p = F.log_softmax(logits_p, dim=1)
    log_q = F.log_softmax(logits_q, dim=1)  # detached: no gradient through the second view
    contrastive = -log_p[:, 0]
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    loss = (alpha * contrastive + beta * kl).mean()
    return loss, {"contrastive": contrastive.mean().detach(), "kl": kl.mean().detach()}


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 2 - 2 cos(p, z): BYOL's normalised MSE; the target is detached."""
    p = F.normalize(at_least_fp32(prediction), dim=1)
    z = F.normalize(at_least_fp32(target.detach()), dim=1)
    return (2.0 - 2.0 * (p * z).sum(1)).mean()


def multicrop_loss(
    pair_loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Stats]],
    online_large: Sequence[torch.Tensor],
    online_small: Sequence[torch.Tensor],
    target_large: Sequence[torch.Tensor],
    include_same_view: bool,
) -> tuple[torch.Tensor, Stats]:
    """The paper's pair loop: every online view (large and small) against every large target view.

    include_same_view=True (RELICv2) keeps the pairs i == j among large views: (L + S) * L pairs.
    include_same_view=False (BYOL) drops them: L * (L - 1) + S * L pairs. Loss and stats are means
    over pairs. Small views never have a target (method.md section 1).
    """
    pairs = [
        (o, t)
        for i, o in enumerate(online_large)
        for j, t in enumerate(target_large)
        if include_same_view or i != j
    ]
    pairs += [(o, t) for o in online_small for t in target_large]
    if not pairs:
        raise ValueError("multicrop_loss needs at least one (online, target) pair")
    total: torch.Tensor | float = 0.0
    stats: Stats = {}
    for o, t in pairs:
        loss, pair_stats = pair_loss_fn(o, t)
        total = total + loss
        for k, v in pair_stats.items():
            stats[k] = stats.get(k, 0.0) + v
    n = len(pairs)
    return total / n, {k: v / n for k, v in stats.items()}


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """Std over the batch of L2-normalised embeddings, averaged over dimensions.

    Collapse monitor: about 1/sqrt(D) for spread-out embeddings, 0 when all rows are equal.
    """
    return F.normalize(at_least_fp32(z.detach()), dim=1).std(dim=0).mean().item()
