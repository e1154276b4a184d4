"""LARS (BYOL formulation), parameter groups and learning-rate schedules (method.md section 3)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from relicv2_cli.errors import RelicError

OPTIMIZERS: tuple[str, ...] = ("lars", "sgd", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio, as in BYOL's release.

    For each parameter w with gradient g, in groups without `lars_exclude`:
        u = g + wd * w
        u = u * eta * ||w|| / ||u||      (ratio 1 when either norm is 0)
    Groups with `lars_exclude=True` (biases, norm parameters) use u = g: no decay, no adaptation.
    Then m = momentum * m + u and w = w - lr * m (plain heavy-ball, no dampening, no Nesterov).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        lars_exclude: bool = False,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS settings lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=lars_exclude
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            if not group["lars_exclude"]:
                if group["weight_decay"] != 0:
                    updates = torch._foreach_add(updates, params, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(updates))
                # All trust ratios in one vectorised op (no host sync, unlike .item() per layer).
                ratio = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, 1.0)
                updates = torch._foreach_mul(updates, list(ratio.unbind()))
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def _split(params: Iterable[torch.Tensor], weight_decay: float) -> list[dict]:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    excluded = [p for p in params if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and all ndim <= 1 params (biases, norm weights),
    flagged `lars_exclude=True` with weight_decay 0. Frozen parameters are left out."""
    return _split(model.parameters(), weight_decay)


def build_optimizer(
    name: str,
    model_or_params: nn.Module | Iterable,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    lars_eta: float = 1e-3,
) -> torch.optim.Optimizer:
    """lars | sgd | adamw. A module or a list of tensors is split with `param_groups`' rule (so SGD
    and AdamW also skip decay on biases and norm parameters); a list of group dicts is used as is."""
    if name not in OPTIMIZERS:
        raise RelicError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if isinstance(model_or_params, nn.Module):
        groups = param_groups(model_or_params, weight_decay)
    else:
        items = list(model_or_params)
        groups = items if items and isinstance(items[0], dict) else _split(items, weight_decay)
    groups = [g for g in groups if len(g["params"]) > 0]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=lars_eta)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from 0 to base_lr over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule used by BYOL/RELICv2: lr = base_lr * batch / 256."""
    return base_lr * batch_size / 256
