"""`relicv2 pretrain`: RELICv2 (and the BYOL / supervised baselines) pre-training of a ResNet.

Read top to bottom: the config, `setup` (data, networks, optimisers), `train_step` (views -> loss ->
backward -> optimiser -> EMA -> probe), `train` (the loop: one place logs, evaluates, checkpoints and
stops), `run_pretrain` (staging directory, resume, artifact) and the Typer command. The options'
rationale is in docs/pretrain.md, the data path of a step in docs/architecture.md.

The run is built in WORKDIR/pretrain/.NAME.partial (checkpoint.pt, metrics.jsonl); SIGTERM/SIGINT
save a checkpoint there and exit, `--resume` continues from it. Every step draws its randomness from
a generator on the training device seeded by (seed, step), so a resumed run sees exactly the batches
and augmentations an uninterrupted run would without saving generator state.

The step never waits for the device: loss, statistics and the non-finite-loss flag stay on it and
are read only on log, evaluation and checkpoint steps (docs/pretrain.md, "Host synchronisation").
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from safetensors.torch import save_file
from torch import nn

from relicv2_cli import artifacts, configfile, distributed, loggers, options, stream
from relicv2_cli.augment import JITTERS, ViewConfig, make_views, views_from_crops
from relicv2_cli.checkpoint import Checkpoint, nonfinite_tensors
from relicv2_cli.data import Dataset, load_dataset, require_labels
from relicv2_cli.errors import RelicError
from relicv2_cli.features import crop_fraction_for
from relicv2_cli.knn import autocast, encode_images, knn_accuracy
from relicv2_cli.losses import at_least_fp32, byol_loss, embedding_std, multicrop_loss, relic_loss
from relicv2_cli.models import build_network, check_network, ema_rate, ema_update, make_target
from relicv2_cli.optim import OPTIMIZERS, build_optimizer, lr_at, scaled_lr
from relicv2_cli.saliency import open_masks

METHODS = ("relicv2", "byol", "supervised")
KL_FORMS = ("target-anchor", "swapped-views")
BN_STATS = ("per-view", "joint")
# fp16: CUDA only, with a gradient scaler; fp64: exactness checks (tests), slow
PRECISIONS = (*options.PRECISIONS, "fp16", "fp64")
CONFIG = "config.json"  # the run's PretrainConfig, for `relicv2 rerun` and `--config`
# Settings a --resume may change: when to stop, and bookkeeping that does not alter the trajectory.
# in_memory may change: the "streamed" it resolves to is compared instead.
RESUMABLE_CHANGES = ("max_steps", "time_budget_min", "extra", "channels_last", "compile", "in_memory",
                     "workers")
# Config keys added after checkpoints were written without them, with the value that reproduces what
# those runs did (Checkpoint's added_later): such a checkpoint resumes when the run sets that value.
# Only keys whose old behaviour is one value belong here (not, say, zero_init_residual, whose old
# default was another, or bn_stats, which used to be joint).
ADDED_LATER = {
    "streamed": False,  # every run decoded its training split in memory
    "skip_bad": False,  # a bad image stopped the run
    "labelled": True,  # unlabelled folders were refused
    "kl_form": "target-anchor",  # the only KL form
    "mask_min_area": 0.0,  # every mask was applied, whatever its area
}
CHANNELS_LAST = ("auto", "on", "off")
# What it may also change after a stop on a NaN or infinity: the step size and the precision, which
# leave the shapes of the saved state alone (derived keys included).
AFTER_NONFINITE_CHANGES = ("lr", "base_lr_scaled", "lars_eta", "weight_decay", "warmup_epochs",
                           "warmup_steps", "precision")
STOPPED_NONFINITE = "stopped-nonfinite.json"  # in the staging directory until the next checkpoint

# Values the ImageNet preset sets (unless the option is given explicitly on the command line).
# Sources: docs/pretrain.md (paper scale; BYOL's released optimiser settings).
PRESETS = {
    "imagenet-1000ep": dict(
        arch="resnet50", stem="imagenet", width=1.0, batch_size=4096, epochs=1000.0, optimizer="lars",
        lr=0.3, lars_eta=1e-3, weight_decay=1.5e-6, warmup_epochs=10.0, ema_base=0.996, proj_hidden=4096,
        proj_dim=256, large_size=224, small_size=96, large_crops=2, small_crops=6, blur=True, mask_prob=0.1,
        zero_init_residual=True,
    ),
}


@dataclass
class PretrainConfig:
    """Every setting of a run; the defaults of the `pretrain` options (one source of truth)."""

    spec: str = "synthetic"
    method: str = "relicv2"
    saliency: str | None = None
    # network
    arch: str = "resnet18"
    width: float = 1.0
    stem: str = "cifar"
    proj_hidden: int = 4096
    proj_dim: int = 256
    predictor: bool = True
    zero_init_residual: bool = False  # BYOL's is on; off learns faster in short runs (docs/pretrain.md)
    head_bias: bool = False  # BYOL's MLP heads: no bias in the last Linear
    bn_stats: str = "per-view"  # BYOL: BatchNorm statistics of each view on its own
    # views
    large_crops: int = 2
    small_crops: int = 2
    large_size: int = 32
    small_size: int = 16
    large_scale_min: float = 0.08
    small_scale: tuple[float, float] = (0.05, 0.14)
    mask_prob: float = 0.1
    mask_min_area: float = 0.05
    blur: bool = False
    jitter: str = "byol"
    # loss
    n_negatives: int = 10
    tau: float = 0.2
    alpha: float = 1.0
    beta: float = 1.0
    kl_form: str = "target-anchor"
    # optimisation
    optimizer: str = "lars"
    batch_size: int = 256
    epochs: float = 100.0
    max_steps: int | None = None
    time_budget_min: float | None = None
    lr: float = 1.0
    lars_eta: float = 0.02
    weight_decay: float = 1e-5
    warmup_epochs: float = 10.0
    ema_base: float = 0.99
    precision: str = "bf16"
    channels_last: str = "auto"  # memory format of activations: auto, on, off (docs/pretrain.md)
    compile: bool = False  # torch.compile the online and target networks
    # bookkeeping
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: int = 500
    eval_every: int | None = None
    log_every: int = 10
    knn_k: int = 20
    knn_temperature: float = 0.07
    # data
    limit_train: int | None = None
    limit_test: int | None = None
    image_size: int | None = None
    in_memory: str = "auto"  # auto, yes, no: decode the training split once, or stream it (stream.choose)
    workers: int | None = None  # loader processes of a streamed run; None: stream.default_workers()
    skip_bad: bool = False
    # filled in by the run
    extra: dict = field(default_factory=dict)


@dataclass
class Run:
    """What `setup` builds: data on the device, networks, optimisers and the step schedule."""

    cfg: PretrainConfig
    device: torch.device
    dataset: Dataset
    images: torch.Tensor | None  # (N, 3, H, W) uint8, the whole training split decoded once; None: streamed
    crops: stream.StepCrops | None  # streamed: each step's crops, made in loader workers
    workers: int  # loader processes (streamed runs and their evaluation)
    data_choice: str  # in memory or streamed, and why (printed by run_pretrain)
    labels: torch.Tensor
    masks: torch.Tensor | None  # (N, H, W) saliency masks, with --saliency in memory (streamed: in `crops`)
    parents: list[artifacts.Artifact]
    views: ViewConfig
    online: nn.Module  # encoder + projector (+ predictor)
    target: nn.Module | None  # EMA copy of encoder + projector; None for supervised
    probe: nn.Linear  # online linear probe on detached features
    optimizer: torch.optim.Optimizer
    probe_optimizer: torch.optim.Optimizer
    train_online: nn.Module  # online and probe in DistributedDataParallel on several processes
    train_probe: nn.Module
    steps_per_epoch: int
    total_steps: int  # the schedule's length (lr, EMA)
    last_step: int  # where this run stops: total_steps or --max-steps
    warmup_steps: int
    eval_every: int
    base_lr: float
    config: dict  # what the manifest and the checkpoint record
    scaler: torch.amp.GradScaler  # fp16: loss scaling; a pass-through otherwise
    batches: Iterator | None = None  # streamed: the loader of step crops, started by `train`


@dataclass
class State:
    """What changes step to step besides the weights; step and train_s go into the checkpoint."""

    step: int = 0
    train_s: float = 0.0  # seconds in optimizer steps (evaluation excluded), for --time-budget
    last_eval: dict = field(default_factory=dict)
    signal: int = 0  # the signal that stopped the run, 0 if none
    out_of_time: bool = False
    # On the device: the first step whose loss was not finite (-1: none) and that loss; read by
    # _check_finite on log/eval/checkpoint steps only, so that no step waits for the device.
    bad_step: torch.Tensor | None = None
    bad_loss: torch.Tensor | None = None
    checkpoint_step: int | None = None  # the step of checkpoint.pt (finite weights), None before the first


class NonFinite(RelicError):
    """The loss or the weights became NaN or infinite; run_pretrain says what was kept."""


# ---------------------------------------------------------------------------------------------------
# Set-up


def setup(cfg: PretrainConfig, dev: torch.device, ddp: distributed.DistContext) -> Run:
    """Data, networks, optimisers and schedule; identical on every process."""
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg.seed)
    _check_cpu_bf16(cfg, dev)
    dataset = load_dataset(cfg.spec, limit_train=cfg.limit_train, limit_test=cfg.limit_test,
                           image_size=cfg.image_size, skip_bad=cfg.skip_bad, seed=cfg.seed)
    if cfg.method == "supervised":
        require_labels(dataset, "pretrain --method supervised")
    streamed, why = stream.choose(cfg.in_memory, dataset, dev, cfg.image_size)
    if streamed:
        _check_streamed(cfg)
    # Streamed runs evaluate centre views at the large crops' size.
    n_train = len(dataset.train)
    height = cfg.large_size if streamed else dataset.train.images.shape[1]
    if cfg.batch_size > n_train:
        raise RelicError(f"--batch-size {cfg.batch_size} is larger than the training split "
                         f"({n_train} images)")
    masks, mask_reader, parents = None, None, []
    if cfg.saliency:  # streamed: the loader's workers read each image's mask with its bytes
        art, train_masks = open_masks(cfg.saliency, dataset, "train", streamed)
        parents = [art]
        if streamed:
            mask_reader = train_masks
        else:
            masks = torch.from_numpy(np.ascontiguousarray(train_masks)).to(dev)

    steps_per_epoch = n_train // cfg.batch_size
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    base_lr = scaled_lr(cfg.lr, cfg.batch_size) if cfg.optimizer != "adamw" else cfg.lr
    online, target, probe = _networks(cfg, dataset.num_classes, dev, ddp)
    config = {**asdict(cfg), "image_size": height, "streamed": streamed, "steps_per_epoch": steps_per_epoch,
              "total_steps": total_steps, "warmup_steps": warmup_steps, "base_lr_scaled": base_lr,
              "feature_dim": online.encoder.feature_dim, "num_classes": dataset.num_classes,
              "class_names": dataset.class_names, "labelled": dataset.labelled}
    config["extra"] = {**config["extra"], **ddp.record()}  # world size: not compared on --resume
    views = view_config(cfg)
    crops = None
    if streamed:
        batches = functools.partial(_batch_indices, steps_per_epoch=steps_per_epoch, n=n_train,
                                    batch=cfg.batch_size, seed=cfg.seed)
        positions = ddp.shard(torch.Generator(), torch.arange(cfg.batch_size))[2]  # this process's rows only
        crops = stream.StepCrops(dataset.train, views, batches, positions, cfg.seed, mask_reader)
    return Run(
        cfg=cfg, device=dev, dataset=dataset, masks=masks, parents=parents, crops=crops,
        images=None if streamed else
        torch.from_numpy(dataset.train.images).permute(0, 3, 1, 2).contiguous().to(dev),
        workers=stream.default_workers() if cfg.workers is None else cfg.workers,
        data_choice=f"{'streamed' if streamed else 'in memory'}: {why}",
        labels=torch.from_numpy(dataset.train.labels).to(dev),
        views=views,
        online=online, target=target, probe=probe,
        optimizer=build_optimizer(cfg.optimizer, online, base_lr, cfg.weight_decay, lars_eta=cfg.lars_eta),
        probe_optimizer=torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.0),
        train_online=ddp.wrap(online), train_probe=ddp.wrap(probe),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_steps=warmup_steps, base_lr=base_lr,
        last_step=min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps,
        eval_every=steps_per_epoch if cfg.eval_every is None else cfg.eval_every, config=config,
        scaler=torch.amp.GradScaler(dev.type, enabled=cfg.precision == "fp16"),
    )


def _check_cpu_bf16(cfg: PretrainConfig, dev: torch.device) -> None:
    """With the imagenet stem, crops of 16 px or less reach layer4 as 1x1 maps, where torch's bf16 CPU
    convolution backward returns garbage weight gradients (NaN, 1e27: reproduced with a lone
    Conv2d(64, 128, 3, 2, 1) on a 1x1 input): refused here rather than stopped at a NaN step."""
    sizes = [cfg.large_size] + ([cfg.small_size] if cfg.small_crops and cfg.method != "supervised" else [])
    if dev.type == "cpu" and cfg.precision == "bf16" and cfg.stem == "imagenet" and min(sizes) <= 16:
        raise RelicError(f"--stem imagenet with {min(sizes)} px crops leaves layer4 1x1 maps, where torch's "
                         "bf16 CPU convolution backward gives garbage gradients: use crops of at least 17 px "
                         "(--large-size, --small-size) or --precision fp32")


def _check_streamed(cfg: PretrainConfig) -> None:
    """What a streamed run cannot do (yet), as one line."""
    if cfg.image_size is not None:
        raise RelicError("--image-size resizes the split decoded in memory; a streamed run crops the full "
                         "images: drop --image-size or use --in-memory yes")


def view_config(cfg: PretrainConfig) -> ViewConfig:
    return ViewConfig(
        large_crops=cfg.large_crops, small_crops=cfg.small_crops if cfg.method != "supervised" else 0,
        large_size=cfg.large_size, small_size=cfg.small_size, large_scale=(cfg.large_scale_min, 1.0),
        small_scale=tuple(cfg.small_scale), mask_prob=cfg.mask_prob, mask_min_area=cfg.mask_min_area,
        blur=cfg.blur, jitter=cfg.jitter,
    )


def _networks(cfg: PretrainConfig, num_classes: int, dev: torch.device, ddp: distributed.DistContext):
    """(online, target, probe) on `dev`, BatchNorm synchronised over processes."""
    online = build_network(cfg.arch, cfg.width, cfg.stem, cfg.proj_hidden, cfg.proj_dim,
                           predictor=cfg.predictor and cfg.method != "supervised",
                           zero_init_residual=cfg.zero_init_residual, head_out_bias=cfg.head_bias).to(dev)
    if cfg.method == "supervised":
        online.projector = nn.Linear(online.encoder.feature_dim, num_classes).to(dev)
    target = make_target(online).to(dev) if cfg.method != "supervised" else None
    probe = nn.Linear(online.encoder.feature_dim, num_classes).to(dev)
    if cfg.precision == "fp64":  # every parameter, activation and loss in float64
        online, probe = online.double(), probe.double()
        target = target.double() if target is not None else None
    online, target = ddp.sync_batchnorm(online), ddp.sync_batchnorm(target)  # BN over the global batch
    if use_channels_last(cfg, dev):
        online = online.to(memory_format=torch.channels_last)
        target = target.to(memory_format=torch.channels_last) if target is not None else None
    if cfg.compile:  # in place: state_dict keys stay those of the plain modules
        online.compile()
        if target is not None:
            target.compile()
    return online, target, probe


def use_channels_last(cfg: PretrainConfig, dev: torch.device) -> bool:
    """--channels-last: auto is on for CUDA, and on CPU for bf16 where the CPU has bf16 instructions
    (measured faster there: docs/benchmarks.md); never for fp64, the exactness-check precision."""
    if cfg.channels_last != "auto":
        return cfg.channels_last == "on"
    if dev.type == "cuda":
        return True
    return dev.type == "cpu" and cfg.precision == "bf16" and _cpu_has_bf16()


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: keep the default format
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------------------------------------------
# One step


def train_step(run: Run, step: int, ddp: distributed.DistContext) -> dict:
    """Optimizer step `step` (0-based): views -> loss -> backward -> optimiser -> EMA -> probe.
    Streamed, run.batches' next item is this step's crops (stream.step_batches).
    Returns what the log needs, as device tensors: nothing here waits for the device."""
    cfg, clock = run.cfg, _StepClock(run.device)
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed * 1_000_003 + step)
    batch_idx = _batch_indices(step, run.steps_per_epoch, len(run.labels), cfg.batch_size, cfg.seed,
                               run.device)
    generator, view_idx, rows, keep = ddp.shard(generator, batch_idx)  # this process's share
    if run.batches is None:
        masks = run.masks[view_idx] if run.masks is not None else None
        views = make_views(run.images[view_idx], run.views, generator, masks).rows(keep)
    else:  # cut and resized in the loader's workers; the photometric part as make_views
        large, small, masked = next(run.batches)  # data time
        large, small = stream.on_device(large, run.device), stream.on_device(small, run.device)
        masked = masked.to(run.device, non_blocking=True)
        if len(view_idx) > len(rows):  # --dist-sampling global: the others' rows as zeros (not decoded)
            large, small = (_in_global_batch(c, len(view_idx), keep) for c in (large, small))
            everyone = masked.new_zeros((len(masked), len(view_idx)))  # (L, batch): others' crops unmasked
            everyone[:, keep] = masked
            masked = everyone
        views = views_from_crops(large, small, run.views, generator, masked).rows(keep)
    labels = run.labels[rows]
    lr = lr_at(step, run.total_steps, run.base_lr, run.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    rate = ema_rate(step, run.total_steps, cfg.ema_base)
    clock.mark()  # views ready

    loss, stats, features, embeddings = _loss(cfg, run.train_online, run.target, views, labels, generator,
                                              run.device, ddp)
    loss_value, stats = ddp.average(loss, stats)  # global-batch mean: the log and the NaN flag agree
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)  # fp16: skipped when a gradient overflowed, and the scale lowered
    run.scaler.update()
    if run.target is not None:
        ema_update(run.target, run.online, rate)
    probe_loss, probe_acc = _probe_step(run.train_probe, run.probe_optimizer, features,
                                        labels.repeat(cfg.large_crops))
    clock.mark()  # step done
    return {"loss": loss_value, "stats": stats, "lr": lr, "ema_rate": rate, "embeddings": embeddings,
            "probe_loss": probe_loss, "probe_train_top1": probe_acc, "clock": clock,
            "host_s": time.perf_counter() - clock.host_start}


def _in_global_batch(crops: torch.Tensor, batch: int, keep: slice) -> torch.Tensor:
    """This process's view-major crops (V * b, ...) at rows `keep` of zeros (V * batch, ...): the
    photometric randomness is drawn for the whole global batch (its draws do not depend on the
    pixels), and only this process's rows are kept, so no process decodes the others' images."""
    b = keep.stop - keep.start
    out = crops.new_zeros((len(crops) // b, batch, *crops.shape[1:]))
    out[:, keep] = crops.unflatten(0, (-1, b))
    return out.flatten(0, 1)


class _StepClock:
    """Marks in one step (start, views ready, done) without waiting for the device: the host clock on
    CPU, where ops run synchronously; CUDA events on GPU, read (waiting for the last) at log time."""

    def __init__(self, dev: torch.device):
        self.cuda, self.host_start, self.marks = dev.type == "cuda", time.perf_counter(), []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> tuple[float, float]:
        """(step seconds, share of them spent making the batch and its views)."""
        start, data, end = self.marks
        if self.cuda:
            end.synchronize()
            total, data_s = start.elapsed_time(end) / 1000, start.elapsed_time(data) / 1000
        else:
            total, data_s = end - start, data - start
        return total, data_s / total if total > 0 else 0.0


def _loss(cfg, online, target, views, labels, generator, dev, ddp=None):
    """The method's loss for one batch of views: (loss, stats, online large-view features for the
    probe, embeddings for the collapse monitor). With several processes (`ddp`), RELICv2 draws
    negatives from the all-gathered global batch: every view's embeddings are gathered once."""
    L, S = len(views.large), len(views.small)
    swapped = cfg.method == "relicv2" and cfg.kl_form == "swapped-views"
    with autocast(dev, cfg.precision):
        features, projection, prediction = _forward(cfg, online, views.large, dev)
        if cfg.method == "supervised":
            return F.cross_entropy(at_least_fp32(projection), labels.repeat(L)), {}, features, features
        small_pred = _forward(cfg, online, views.small, dev)[2] if S else None
        with torch.no_grad():
            target_proj = _forward(cfg, target, views.large, dev)[1]
            # the swapped-views KL needs the target embedding of every online view, small ones included
            small_target = _forward(cfg, target, views.small, dev)[1] if S and swapped else None
    online_views = list(at_least_fp32(prediction).chunk(L))
    online_views += list(at_least_fp32(small_pred).chunk(S)) if S else []
    target_views = list(at_least_fp32(target_proj).chunk(L))
    target_views += list(at_least_fp32(small_target).chunk(S)) if small_target is not None else []
    if cfg.method != "relicv2":
        loss, stats = multicrop_loss(lambda o, t: (byol_loss(o[0], t[0]), {}), _tagged(online_views[:L]),
                                     _tagged(online_views[L:], L), _tagged(target_views),
                                     include_same_view=False)
        return loss, stats, features, projection

    pools = ddp.gather(online_views + target_views) if ddp is not None else None  # None on one process
    where = {} if pools is None else {"offset": ddp.rank * len(labels),
                                      "global_rows": ddp.sampling == "global"}
    pools = pools or [None] * (len(online_views) + len(target_views))
    online_tagged = _tagged(online_views, 0, pools[:len(online_views)])
    target_tagged = _tagged(target_views, 0, pools[len(online_views):])

    def pair(o, t):  # (embeddings, their global pool or None, view index)
        kl = None
        if swapped:  # online embedding of t's view against the target embeddings of o's view
            of_o = target_tagged[o[2]]
            kl = (online_views[t[2]], of_o[1] if of_o[1] is not None else of_o[0])
        return relic_loss(o[0], t[0], cfg.n_negatives, cfg.tau, cfg.alpha, cfg.beta, generator=generator,
                          target_pool=t[1], online_pool=o[1], swapped=kl, **where)

    loss, stats = multicrop_loss(pair, online_tagged[:L], online_tagged[L:], target_tagged[:L],
                                 include_same_view=True)
    return loss, stats, features, projection


def _forward(cfg, net, views: list[torch.Tensor], dev) -> tuple[torch.Tensor, ...]:
    """net on a list of same-size views, outputs concatenated in view order. --bn-stats per-view runs
    each view on its own (BatchNorm statistics per view, as BYOL), joint runs them as one batch."""
    dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
    xs = [v.to(dtype) for v in views]
    if use_channels_last(cfg, dev):
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    if cfg.bn_stats == "joint":
        return net(torch.cat(xs))
    outputs = [net(x) for x in xs]
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


def _tagged(embeddings: list, first: int = 0, pools: list | None = None) -> list[tuple]:
    """(embeddings, pool, view index) per view, for the pair loop."""
    pools = pools if pools is not None else [None] * len(embeddings)
    return [(e, p, first + k) for k, (e, p) in enumerate(zip(embeddings, pools, strict=True))]


def _batch_indices(step: int, steps_per_epoch: int, n: int, batch: int, seed: int,
                   device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The images of optimizer step `step` on `device`: a fresh permutation per epoch (seeded by seed
    and epoch), last partial batch dropped. Pure function of the step, so resume needs no sampler state."""
    epoch, within = divmod(step, steps_per_epoch)
    return _epoch_permutation(n, seed, epoch, device)[within * batch : (within + 1) * batch]


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    # Drawn on the CPU (the same order on every device) and copied once per epoch: a copy to the GPU
    # every step would wait for it. Two entries: a streamed run with --workers 0 also reads the CPU's.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).to(device)


def _probe_step(probe, probe_optimizer, features, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Online linear probe on detached features (solo-learn/BYOL monitor); never touches the encoder.
    Returns (loss, accuracy) as device tensors, read at log time."""
    logits = probe(at_least_fp32(features.detach()))
    loss = F.cross_entropy(logits, labels)
    probe_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    probe_optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).float().mean()


# ---------------------------------------------------------------------------------------------------
# The loop


def train(run: Run, state: State, checkpoint: Checkpoint, ddp: distributed.DistContext, *, log, progress,
          task, step_callback=None) -> None:
    """Steps until the last step, the time budget or a signal (SIGTERM/SIGINT on any process)."""
    cfg, received = run.cfg, []
    # Streamed: the loader starts at this run's first step (a resumed run's too) and works ahead.
    if run.crops is not None:
        run.batches = stream.step_batches(run.crops, state.step, run.last_step, run.workers,
                                          run.device.type == "cuda")
    with options.handle_signals(lambda signum, _frame: received.append(signum)), \
            (contextlib.closing(run.batches) if run.batches else contextlib.nullcontext()):  # workers end
        while state.step < run.last_step and not state.signal and not state.out_of_time:
            out = train_step(run, state.step, ddp)
            _watch_loss(state, out["loss"])
            state.step += 1
            state.train_s += out["host_s"]  # the host waits once the device's queue is full
            if step_callback is not None:  # tests: a signal or a crash at a chosen step
                step_callback(state.step)
            budget_spent = cfg.time_budget_min is not None and state.train_s >= 60 * cfg.time_budget_min
            # Several processes agree on stopping in a collective the host waits for: on log steps only.
            if not ddp.active or _log_step(run, state.step):
                state.signal, state.out_of_time = ddp.stop_vote(received, budget_spent)
            _after_step(run, state, out, checkpoint, ddp, log=log, progress=progress, task=task)


def _log_step(run: Run, step: int) -> bool:
    return step % run.cfg.log_every == 0 or step == 1 or step == run.last_step


def _watch_loss(state: State, loss: torch.Tensor) -> None:
    """Remember, on the device, the first step (0-based, state.step) whose loss is not finite."""
    if state.bad_step is None:
        state.bad_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
        state.bad_loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
    first = ~torch.isfinite(loss) & (state.bad_step < 0)
    state.bad_step = torch.where(first, state.step, state.bad_step)
    state.bad_loss = torch.where(first, loss, state.bad_loss)


def _check_finite(state: State) -> None:
    """Stop if a loss was not finite since the start: the one read of the device's flag, before
    anything is logged or saved, so no checkpoint holds weights trained on a bad loss."""
    if state.bad_step is None or (bad := int(state.bad_step)) < 0:
        return
    raise NonFinite(f"loss became {float(state.bad_loss)} at step {bad}")


def _after_step(run: Run, state: State, out: dict, checkpoint: Checkpoint, ddp, *, log, progress,
                task) -> None:
    """The one place that logs, evaluates and checkpoints (a signal's checkpoint comes after the loop)."""
    cfg, step = run.cfg, state.step
    final = step == run.last_step or state.out_of_time
    log_now = _log_step(run, step) or final
    # Without labels there is nothing to score: kNN and probe evaluation are skipped (docs/data.md).
    eval_now = (bool(run.eval_every and step % run.eval_every == 0) or final) and run.dataset.labelled
    if log_now or eval_now or step % cfg.checkpoint_every == 0 or state.signal:
        _check_finite(state)
    record = {}
    if log_now:  # the device's values are read here only
        seconds, data_fraction = out["clock"].seconds()
        record = {"step": step, "epoch": round(step / run.steps_per_epoch, 4), "loss": out["loss"].item(),
                  **{k: float(v) for k, v in out["stats"].items()}, "lr": out["lr"],
                  "ema_rate": out["ema_rate"],
                  "embedding_std": embedding_std(out["embeddings"]), "probe_loss": out["probe_loss"].item(),
                  "probe_train_top1": out["probe_train_top1"].item(),
                  "images_per_s": cfg.batch_size / seconds, "data_fraction": data_fraction}
        if run.scaler.is_enabled():
            record["grad_scale"] = run.scaler.get_scale()
    if eval_now:
        if final and run.batches is not None:  # no more steps: the training loader's workers end first
            run.batches.close()
        encode = encode_images if run.crops is None else stream.encode_streamed
        state.last_eval = _evaluate(run, progress, ddp.encode(encode))
        record = {"step": step, **record, **state.last_eval}
    if record:
        log.write(record)  # metrics.jsonl, and --logger's scalars
    if "loss" in record:
        knn = f" knn {state.last_eval['knn_top1']:.3f}" if state.last_eval else ""
        progress.update(task, info=f"loss {record['loss']:.3f}{knn}")
    progress.update(task, completed=step)
    if step % cfg.checkpoint_every == 0:
        save_checkpoint(run, state, checkpoint, ddp)


def save_checkpoint(run: Run, state: State, checkpoint: Checkpoint, ddp: distributed.DistContext) -> None:
    """Write checkpoint.pt, or raise NonFinite when a weight or optimiser tensor is NaN or infinite:
    the loss can stay finite a step after the weights are lost, so the weights themselves are checked
    and every checkpoint on disk is one to resume from."""
    saved = {
        "step": state.step, "train_s": state.train_s, "online": run.online.state_dict(),
        "probe": run.probe.state_dict(), "target": run.target.state_dict() if run.target is not None else {},
        "optimizer": run.optimizer.state_dict(), "probe_optimizer": run.probe_optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
    }
    bad = nonfinite_tensors({k: saved[k] for k in ("online", "target", "probe", "optimizer")})
    if bad:  # every process holds the same weights, so all of them stop here
        raise NonFinite(f"{len(bad)} weight and optimiser tensors became NaN or infinite by step "
                        f"{state.step} (first {bad[0]}) while the loss was finite")
    if ddp.is_main:  # rank 0 alone writes
        checkpoint.save(saved)
        (checkpoint.path.parent / STOPPED_NONFINITE).unlink(missing_ok=True)
    state.checkpoint_step = state.step


def load_checkpoint(run: Run, state: State, checkpoint: Checkpoint, ddp: distributed.DistContext) -> None:
    saved = checkpoint.load(run.device)
    run.online.load_state_dict(saved["online"])
    if run.target is not None:
        run.target.load_state_dict(saved["target"])
    run.probe.load_state_dict(saved["probe"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.probe_optimizer.load_state_dict(saved["probe_optimizer"])
    if saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    state.step, state.train_s = saved["step"], saved.get("train_s", 0.0)
    state.checkpoint_step = state.step
    if ddp.is_main:
        _truncate_metrics(checkpoint.path.parent / artifacts.METRICS, state.step)


def _evaluate(run: Run, progress, encode=encode_images) -> dict:
    """Weighted kNN (train split as memory) and online-probe accuracy on the test split. `encode`:
    encode_images, or its version sharded over processes (relicv2_cli.distributed)."""
    cfg, dataset, dev = run.cfg, run.dataset, run.device
    size = run.config["image_size"]
    if run.crops is None:
        train_x, test_x = dataset.train.images, dataset.test.images
    else:  # decoded in chunks by the loader's workers
        train_x, test_x = (stream.StreamedImages(s, run.workers) for s in (dataset.train, dataset.test))
    view = dict(image_size=size, device=dev, precision=cfg.precision, progress=progress,
                crop_fraction=crop_fraction_for("auto", dataset))  # the view of the eval stages' default
    train_f = encode(run.online.encoder, train_x, **view)
    test_f = encode(run.online.encoder, test_x, **view)
    knn = knn_accuracy(train_f, dataset.train.labels, test_f, dataset.test.labels, dataset.num_classes,
                       cfg.knn_k, cfg.knn_temperature)
    with torch.no_grad():
        probe_pred = run.probe(test_f.to(dev, run.probe.weight.dtype)).argmax(1).cpu()
    probe_acc = (probe_pred == torch.from_numpy(dataset.test.labels)).float().mean().item()
    return {"knn_top1": knn, "probe_top1": probe_acc}


# ---------------------------------------------------------------------------------------------------
# The run


@distributed.entry_point
def run_pretrain(
    cfg: PretrainConfig,
    *,
    workdir: Path,
    name: str | None = None,
    device: str = "auto",
    force: bool = False,
    resume: bool = False,
    quiet: bool = False,
    step_callback=None,
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S,
    dist_sampling: str = "local",
    logger: str | None = None,
) -> artifacts.Artifact:
    """Train and commit a `pretrain` artifact. `step_callback(step)` runs after every optimizer step
    (tests use it to send a signal at a chosen step). Under torchrun (RANK/WORLD_SIZE set) the run is
    data-parallel over the processes, cfg.batch_size being the global batch (relicv2_cli.distributed).
    `logger`: tensorboard or mlflow, which also receive metrics.jsonl's scalars (relicv2_cli.loggers)."""
    _check_config(cfg)
    # identity on one process
    ddp = distributed.setup(options.resolve_device(device), dist_timeout, dist_sampling)
    ddp.check_batch(cfg.batch_size)
    if cfg.precision == "bf16" and ddp.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RelicError("this GPU does not support bf16; use --precision fp32")
    if cfg.precision == "fp16" and ddp.device.type != "cuda":
        # CPUs without fp16 units emulate it: measured 30x slower than fp32 (docs/pretrain.md)
        raise RelicError("--precision fp16 needs a CUDA device (float16 autocast with a gradient scaler); "
                         "on the CPU use bf16 or fp32")
    run = setup(cfg, ddp.device, ddp)
    if cfg.in_memory == "auto" and ddp.is_main and not quiet:
        options.console.print(f"data {run.data_choice}", markup=False, highlight=False, soft_wrap=True)
    name = name or f"{cfg.method}-{cfg.spec.split(':')[0]}-{cfg.arch}"
    # Rank 0 opens the staging directory; under torchrun --resume with nothing to resume starts afresh.
    staging, resume = ddp.open_staging(workdir, "pretrain", name, force=force, resume=resume)
    with staging:
        # After a stop on a NaN, the advised --resume with a lower --lr is allowed.
        may_change = RESUMABLE_CHANGES
        if resume and (staging.dir / STOPPED_NONFINITE).exists():
            may_change += AFTER_NONFINITE_CHANGES
        checkpoint, state = Checkpoint(staging.dir, run.config, may_change, ADDED_LATER), State()
        if resume:
            load_checkpoint(run, state, checkpoint, ddp)
        if ddp.is_main:
            artifacts.atomic_write_bytes(staging.dir / CONFIG, _settings_json(cfg))
        t_start = time.perf_counter()
        try:
            with loggers.RunLog(staging.dir / artifacts.METRICS if ddp.is_main else None, logger, name=name,
                                params=run.config, start_step=state.step) as log, \
                    options.progress_bar(quiet or not ddp.is_main) as progress:
                task = progress.add_task(f"{cfg.method} {name}", total=run.last_step, completed=state.step,
                                         info="", unit="steps", images_per_item=cfg.batch_size)
                train(run, state, checkpoint, ddp, log=log, progress=progress, task=task,
                      step_callback=step_callback)
            save_checkpoint(run, state, checkpoint, ddp)
        except NonFinite as e:
            raise _nonfinite_stop(e, state, staging, ddp) from None
        ddp.barrier()  # the others wait for rank 0's checkpoint (torchrun stops everyone once one exits)
        if state.signal:
            options.console.print(f"stopped by {signal.Signals(state.signal).name} at step {state.step}/"
                                  f"{run.last_step}; checkpoint saved in {staging.dir}; continue with "
                                  f"{_resume_flags(staging)}")
            raise typer.Exit(128 + state.signal)
        if not ddp.is_main:
            return staging.commit()  # waits for rank 0's commit, then opens the artifact it wrote
        return _commit(run, state, staging, t_start)


def _resume_flags(staging) -> str:
    """The flags that continue this run: with an artifact of the same name (a --force run), --resume
    alone would stop at "artifact exists"."""
    return "--resume --force" if staging.final.exists() else "--resume"


def _nonfinite_stop(error: NonFinite, state: State, staging, ddp) -> RelicError:
    """The one-line error of a stop on a NaN: which checkpoint is kept (its step; one with finite
    weights, save_checkpoint sees to that) and how to go on. A marker lets that --resume change --lr."""
    if state.checkpoint_step is None:  # Staging(checkpoint=...) removes the staging directory
        return RelicError(f"{error}; stopped. No checkpoint was written before it, so there is nothing to "
                          "resume: rerun with a lower --lr or --precision fp32")
    if ddp.is_main:
        artifacts.atomic_write_bytes(staging.dir / STOPPED_NONFINITE, json.dumps(
            {"stopped_at": str(error), "checkpoint_step": state.checkpoint_step}).encode())
    return RelicError(f"{error}; stopped. The last checkpoint with finite weights (step "
                      f"{state.checkpoint_step}) is kept in {staging.dir}: continue from it with "
                      f"{_resume_flags(staging)} and a lower --lr or --precision fp32")


def _commit(run: Run, state: State, staging, t_start: float) -> artifacts.Artifact:
    """Export the encoder (safetensors and torch) and commit the artifact with its metrics."""
    cfg = run.cfg
    encoder_state = {k: v.detach().cpu().contiguous() for k, v in run.online.encoder.state_dict().items()}
    save_file(encoder_state, str(staging.dir / "backbone.safetensors"),
              metadata={"arch": cfg.arch, "width": str(cfg.width), "stem": cfg.stem})
    torch.save(encoder_state, staging.dir / "backbone.pt")
    metrics = {"steps": state.step, "epochs": round(state.step / run.steps_per_epoch, 3), **state.last_eval,
               "wall_s": round(time.perf_counter() - t_start, 1), "train_s": round(state.train_s, 1),
               "stopped_by": "time_budget" if state.out_of_time else "steps"}
    final = _last_record(staging.dir / artifacts.METRICS)
    metrics.update({k: final[k] for k in ("loss", "contrastive", "kl", "embedding_std", "images_per_s")
                    if k in final})
    return staging.commit(config=run.config, parents=run.parents, dataset=run.dataset.record(),
                          metrics=metrics)


def _settings_json(cfg: PretrainConfig) -> bytes:
    return (json.dumps(artifacts.jsonable(asdict(cfg)), indent=2) + "\n").encode()


MIN_CROP = 8  # px: smaller crops leave the ResNet's last stage a 1x1 map of a few pixels' worth


def _check_config(cfg: PretrainConfig) -> None:
    """Every option against its range, before anything is read or written: a nonsense value is a
    one-line error naming the option, never a run that trains to a useless artifact."""
    options.check_choice("--method", cfg.method, METHODS)
    check_network(cfg.arch, cfg.width, cfg.stem)
    options.check_choice("--optimizer", cfg.optimizer, OPTIMIZERS)
    options.check_choice("--precision", cfg.precision, PRECISIONS)
    options.check_choice("--kl-form", cfg.kl_form, KL_FORMS)
    options.check_choice("--bn-stats", cfg.bn_stats, BN_STATS)
    options.check_choice("--jitter", cfg.jitter, JITTERS)
    options.check_choice("--channels-last", cfg.channels_last, CHANNELS_LAST)
    options.check_choice("--in-memory", cfg.in_memory, stream.IN_MEMORY)
    if cfg.large_crops < 1 or cfg.small_crops < 0:
        raise RelicError("need --large-crops >= 1 and --small-crops >= 0")
    if cfg.method == "byol" and cfg.large_crops < 2:
        raise RelicError("byol compares different views: needs --large-crops >= 2")
    if cfg.saliency and cfg.method == "supervised":
        raise RelicError("--saliency applies to self-supervised methods only")
    for flag, value in (("--proj-hidden", cfg.proj_hidden), ("--proj-dim", cfg.proj_dim),
                        ("--epochs", cfg.epochs), ("--max-steps", cfg.max_steps),
                        ("--time-budget", cfg.time_budget_min), ("--lr", cfg.lr),
                        ("--lars-eta", cfg.lars_eta), ("--tau", cfg.tau),
                        ("--checkpoint-every", cfg.checkpoint_every),
                        ("--log-every", cfg.log_every), ("--knn-k", cfg.knn_k),
                        ("--knn-temperature", cfg.knn_temperature), ("--limit-train", cfg.limit_train),
                        ("--limit-test", cfg.limit_test)):
        options.check_positive(flag, value)
    for flag, value, low in (("--batch-size", cfg.batch_size, 2), ("--large-size", cfg.large_size, MIN_CROP),
                             ("--small-size", cfg.small_size, MIN_CROP),
                             ("--image-size", cfg.image_size, MIN_CROP),
                             ("--weight-decay", cfg.weight_decay, 0),
                             ("--warmup-epochs", cfg.warmup_epochs, 0), ("--eval-every", cfg.eval_every, 0),
                             ("--alpha", cfg.alpha, 0), ("--beta", cfg.beta, 0),
                             ("--workers", cfg.workers, 0)):
        options.check_at_least(flag, value, low)
    for flag, value in (("--mask-prob", cfg.mask_prob), ("--mask-min-area", cfg.mask_min_area),
                        ("--ema-base", cfg.ema_base)):
        options.check_range(flag, value, 0, 1)
    for flag, value in (("--large-scale-min", cfg.large_scale_min), ("--small-scale-min", cfg.small_scale[0]),
                        ("--small-scale-max", cfg.small_scale[1])):
        options.check_range(flag, value, 0, 1, low_open=True)
    if cfg.small_scale[0] > cfg.small_scale[1]:
        raise RelicError(f"--small-scale-min {cfg.small_scale[0]} is above --small-scale-max "
                         f"{cfg.small_scale[1]}")
    if cfg.method == "relicv2":
        if cfg.alpha == 0 and cfg.beta == 0:
            raise RelicError("--alpha 0 and --beta 0 leave no loss to train on")
        if not 1 <= cfg.n_negatives < cfg.batch_size:
            raise RelicError(f"--n-negatives must be at least 1 and below --batch-size {cfg.batch_size} (the "
                             f"negatives are other images of the batch), got {cfg.n_negatives}")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log has no duplicates."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    artifacts.atomic_write_bytes(path, ("\n".join(keep) + "\n").encode() if keep else b"")


def _last_record(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    full = [r for r in records if "loss" in r]
    return full[-1] if full else {}


# ---------------------------------------------------------------------------------------------------
# The command: defaults from PretrainConfig; why each default is what it is: docs/pretrain.md.

D = PretrainConfig()


def _opt(help: str, *flags: str):
    return typer.Option(*flags, help=help)


Logger = Annotated[str | None, _opt("tensorboard or mlflow: also send metrics.jsonl's scalars there "
                                   "(optional extras).")]


def command(
    ctx: typer.Context,
    spec: options.Spec = D.spec,
    method: Annotated[str, _opt("relicv2, byol or supervised.")] = D.method,
    saliency: Annotated[Path | None, _opt("Saliency artifact: remove the background of large crops.")] = None,
    config: Annotated[Path | None, _opt("Settings file (.json, .yaml): option names or PretrainConfig fields "
                                        "to values; options given on the command line win.")] = None,
    preset: Annotated[str | None,
                      _opt("imagenet-1000ep: the paper's ImageNet settings; explicit options win.")] = None,
    arch: options.Arch = D.arch,
    width: options.Width = D.width,
    stem: options.Stem = D.stem,
    proj_hidden: Annotated[int, _opt("Projector/predictor hidden size.")] = D.proj_hidden,
    proj_dim: Annotated[int, _opt("Projector/predictor output size.")] = D.proj_dim,
    predictor: Annotated[bool, _opt("Use a predictor on the online side.")] = D.predictor,
    zero_init_residual: Annotated[bool, _opt("Zero-init the last BatchNorm scale of each residual block "
                                             "(BYOL).")] = D.zero_init_residual,
    head_bias: Annotated[bool, _opt("Bias in the last Linear of projector and predictor (BYOL: "
                                    "none).")] = D.head_bias,
    bn_stats: Annotated[str, _opt("per-view (BatchNorm statistics of each view on its own, BYOL) or joint "
                                  "(all views of a size as one batch).")] = D.bn_stats,
    large_crops: Annotated[int, _opt("L, large crops per image (online and target).")] = D.large_crops,
    small_crops: Annotated[int,
                           _opt("S, small crops per image (online only, never masked).")] = D.small_crops,
    large_size: Annotated[int, _opt("Side of large crops in pixels.")] = D.large_size,
    small_size: Annotated[int, _opt("Side of small crops in pixels.")] = D.small_size,
    large_scale_min: Annotated[float, _opt("Smallest area fraction of a large crop.")] = D.large_scale_min,
    small_scale_min: Annotated[float, _opt("Smallest area fraction of a small crop.")] = D.small_scale[0],
    small_scale_max: Annotated[float, _opt("Largest area fraction of a small crop.")] = D.small_scale[1],
    mask_prob: Annotated[float,
                         _opt("p_m, probability that a large crop is background-removed.")] = D.mask_prob,
    mask_min_area: Annotated[float, _opt("Masks covering less than this area fraction are not "
                                         "applied.")] = D.mask_min_area,
    blur: Annotated[bool, _opt("Gaussian blur in the views.")] = D.blur,
    jitter: Annotated[str, _opt("Colour jitter semantics: byol (its released code) or "
                                "torchvision (ColorJitter).")] = D.jitter,
    n_negatives: Annotated[int, _opt("n_e, random negatives per anchor.")] = D.n_negatives,
    tau: Annotated[float, _opt("Temperature of the similarity softmax.")] = D.tau,
    alpha: Annotated[float, _opt("Weight of the contrastive term.")] = D.alpha,
    beta: Annotated[float, _opt("Weight of the KL invariance term.")] = D.beta,
    kl_form: Annotated[str, _opt("KL's second distribution: target-anchor (target anchor against "
                                 "online candidates) or swapped-views (RELIC: the two views "
                                 "exchanged).")] = D.kl_form,
    optimizer: Annotated[str, _opt("lars, sgd or adamw.")] = D.optimizer,
    batch_size: options.BatchSize = D.batch_size,
    epochs: options.Epochs = D.epochs,
    max_steps: options.MaxSteps = D.max_steps,
    time_budget: Annotated[float | None,
                           _opt("Stop after this many minutes of training steps.")] = D.time_budget_min,
    lr: Annotated[float, _opt("Base learning rate (lars/sgd: times batch / 256).")] = D.lr,
    lars_eta: Annotated[float, _opt("LARS trust coefficient.")] = D.lars_eta,
    weight_decay: Annotated[float,
                            _opt("Weight decay (not on biases and norm parameters).")] = D.weight_decay,
    warmup_epochs: Annotated[float, _opt("Linear warm-up epochs before the cosine decay.")] = D.warmup_epochs,
    ema_base: Annotated[float, _opt("Target EMA rate at step 0, rising to 1 by a cosine.")] = D.ema_base,
    precision: Annotated[str, _opt("bf16 (autocast), fp16 (CUDA: autocast + gradient scaler), fp32, or fp64 "
                                   "(float64 everywhere: slow; for exactness checks).")] = D.precision,
    channels_last: Annotated[str, _opt("Channels-last memory format: auto (CUDA; CPU with bf16 instructions "
                                       "under bf16), on or off.")] = D.channels_last,
    compile: Annotated[bool, _opt("torch.compile the online and target networks (slow first steps).",
                                  "--compile")] = D.compile,
    deterministic: Annotated[bool, _opt("Deterministic kernels.", "--deterministic")] = D.deterministic,
    checkpoint_every: Annotated[int, _opt("Save a resumable checkpoint every N steps.")] = D.checkpoint_every,
    eval_every: Annotated[int | None, _opt("kNN + probe test accuracy every N steps (default: each "
                                           "epoch; 0: at the end).")] = D.eval_every,
    log_every: Annotated[int, _opt("Write a metrics.jsonl line every N steps.")] = D.log_every,
    resume: Annotated[bool, _opt("Continue an interrupted run of the same --name.", "--resume")] = False,
    logger: Logger = None,
    dist_timeout: Annotated[float, _opt("torchrun: seconds to wait for the other processes in a "
                                        "collective.")] = distributed.DEFAULT_TIMEOUT_S,
    dist_sampling: Annotated[str,
                             _opt("torchrun: local or global drawing of views and negatives.")] = "local",
    limit_train: options.LimitTrain = D.limit_train,
    limit_test: options.LimitTest = D.limit_test,
    image_size: options.ImageSize = D.image_size,
    in_memory: Annotated[str, _opt("auto, yes or no: decode the training split into memory once (fastest), "
                                   "or stream it: decode and crop each step's images in loader workers. "
                                   "auto streams when the decoded data would take more than half the "
                                   "available RAM or free GPU memory.")] = D.in_memory,
    workers: Annotated[int | None, _opt("Loader processes of a streamed run (default: the usable CPU cores "
                                        "less one, at most 8; 0: in the training process).")] = D.workers,
    skip_bad: options.SkipBad = D.skip_bad,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: options.Name = None,
    seed: options.Seed = D.seed,
    device: options.Device = "auto",
    force: options.Force = False,
    quiet: options.Quiet = False,
) -> None:
    """Pre-train a ResNet with RELICv2 (or BYOL / supervised) and write a `pretrain` artifact."""
    _run_command(ctx, dict(locals()))


def _run_command(ctx: typer.Context, values: dict) -> None:
    """The command's options -> PretrainConfig (the preset filling options left at their default)
    -> run_pretrain -> a one-line summary and the artifact path."""
    preset, config = values.pop("preset"), values.pop("config")
    if preset is not None:
        if preset not in PRESETS:
            raise RelicError(f"unknown --preset {preset!r}; valid: {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            if ctx.get_parameter_source(key).name == "DEFAULT":  # explicit options win over the preset
                values[key] = value
    values.pop("ctx")
    values["time_budget_min"] = values.pop("time_budget")
    values["small_scale"] = (values.pop("small_scale_min"), values.pop("small_scale_max"))
    values["saliency"] = str(values["saliency"]) if values["saliency"] else None
    run_options = {k: values.pop(k) for k in ("workdir", "name", "device", "force", "resume", "quiet",
                                              "dist_timeout", "dist_sampling", "logger")}
    extra = {"preset": preset}
    if config is not None:
        values, extra = _with_file(ctx, values, config, preset)
    _finish_command(PretrainConfig(**values, extra=extra), run_options)


# Options whose names differ from PretrainConfig's fields (settings files may use either).
OPTION_FIELDS = {"time_budget": "time_budget_min"}
SMALL_SCALE = ("small_scale_min", "small_scale_max")


def _with_file(ctx: typer.Context, values: dict, path: Path, preset: str | None) -> tuple[dict, dict]:
    """`values` (the options, preset applied) with a settings file's values for every option not given
    on the command line. The file may hold any PretrainConfig field, also those without an option."""
    what = f"--config {path}"
    settings = configfile.read_settings(path)
    settings = {OPTION_FIELDS.get(k, k): v for k, v in settings.items()}
    if any(k in settings for k in SMALL_SCALE):
        small = list(settings.pop("small_scale", values["small_scale"]))
        for i, key in enumerate(SMALL_SCALE):
            small[i] = settings.pop(key, small[i])
        settings["small_scale"] = small
    settings = configfile.check_settings(PretrainConfig, settings, what)
    given = {name for name in ctx.params if ctx.get_parameter_source(name).name != "DEFAULT"}
    for key, value in settings.items():
        if key == "small_scale":  # one option per bound
            value = tuple(values[key][i] if SMALL_SCALE[i] in given else value[i] for i in range(2))
        elif {key, *(k for k, v in OPTION_FIELDS.items() if v == key)} & given:
            continue
        values[key] = value
    extra = {"preset": None, **values.pop("extra", {}), "config": str(path)}
    if preset is not None:  # the file's extra may name the preset its values came from
        extra["preset"] = preset
    return values, extra


def _finish_command(cfg: PretrainConfig, run_options: dict) -> None:
    """run_pretrain, then a one-line summary and the artifact path."""
    art = run_pretrain(cfg, **run_options)
    if not distributed.is_main_process():  # torchrun: rank 0 prints the summary and the path
        return
    if not run_options["quiet"]:
        m = art.metrics
        scores = (f"kNN top-1 {m.get('knn_top1', float('nan')):.3f}, probe top-1 "
                  f"{m.get('probe_top1', float('nan')):.3f}") if art.config.get("labelled", True) \
            else "kNN and probe evaluation skipped (unlabelled images)"
        options.console.print(f"{cfg.method}: {m['steps']} steps, loss {m.get('loss', float('nan')):.4f}, "
                              f"{scores}")
    options.finish(art.path)


# ---------------------------------------------------------------------------------------------------
# `relicv2 rerun`: a pretrain artifact's recorded settings (config.json) into a new artifact.


def rerun(
    art: Annotated[Path, typer.Argument(help="A pretrain artifact directory.", show_default=False)],
    workdir: Annotated[Path | None, _opt("Root folder of the new artifact (default: ART's).")] = None,
    name: Annotated[str | None, _opt("Name of the new artifact (default: ART's name + '-rerun').")] = None,
    logger: Logger = None,
    device: options.Device = "auto",
    force: options.Force = False,
    quiet: options.Quiet = False,
) -> None:
    """Run a pretrain artifact's recorded settings again into a new artifact."""
    source = artifacts.load_artifact(art, kind="pretrain")
    if CONFIG not in source.manifest.get("files", {}):
        raise RelicError(f"{source.path} has no {CONFIG} (made before `relicv2 rerun` existed); its settings "
                         "are in its manifest's config")
    recorded = configfile.read_settings(source.file(CONFIG), f"{source.path}/{CONFIG}")
    known = {f.name for f in fields(PretrainConfig)}
    settings = configfile.check_settings(PretrainConfig, {k: v for k, v in recorded.items() if k in known},
                                         f"{source.path}/{CONFIG}")
    notes = [f"code {', '.join(diff)}" for diff in [artifacts.tool_differences(source)] if diff]
    if set(recorded) - known:
        notes.append(f"settings this code no longer has, ignored: {', '.join(sorted(set(recorded) - known))}")
    if known - set(recorded):
        defaults = asdict(D)
        notes.append("settings that code did not record, at today's defaults: "
                     + ", ".join(f"{k}={defaults[k]!r}" for k in sorted(known - set(recorded))))
    if notes:  # say it even with --quiet: the new run may differ from ART for these reasons alone
        options.console.print(f"rerun of {source.path}: " + "; ".join(notes), markup=False, highlight=False,
                              soft_wrap=True)
    settings["extra"] = {**settings.get("extra", {}), "rerun_of": str(source.path.resolve()),
                         "rerun_of_digest": source.digest}
    run_options = {"workdir": workdir or source.path.parent.parent, "name": name or f"{source.name}-rerun",
                   "device": device, "force": force, "resume": False, "quiet": quiet, "logger": logger}
    _finish_command(PretrainConfig(**settings), run_options)
