"""`relicv2 pretrain`: RELICv2 (and BYOL / supervised baselines) pre-training of a ResNet.

Data flow, one step: uint8 batch on the device -> multi-crop views (mask-aware, batched) ->
online network (all large views in one forward, all small views in another) and EMA target (large
views only) -> pair loop of the method's loss -> optimizer step -> EMA update -> metrics.jsonl.

The artifact directory is built under WORKDIR/pretrain/.NAME.partial, which holds checkpoint.pt
and metrics.jsonl while training; SIGTERM/SIGINT save a checkpoint there and exit, `--resume`
continues from it. Every step draws its randomness from a generator seeded by (seed, step), so a
resumed run sees exactly the batches and augmentations an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from safetensors.torch import save_file
from torch import nn

from relicv2_cli import artifacts, distributed, options
from relicv2_cli.augment import ViewConfig, make_views
from relicv2_cli.data import load_dataset
from relicv2_cli.errors import RelicError
from relicv2_cli.knn import autocast, encode_images, knn_accuracy
from relicv2_cli.losses import at_least_fp32, byol_loss, embedding_std, multicrop_loss, relic_loss
from relicv2_cli.models import ARCHS, STEMS, WIDTHS, build_network, ema_rate, ema_update, make_target
from relicv2_cli.optim import OPTIMIZERS, build_optimizer, lr_at, scaled_lr

METHODS = ("relicv2", "byol", "supervised")
PRECISIONS = ("bf16", "fp32", "fp64")  # fp64: exactness checks (tests), slow
CHECKPOINT = "checkpoint.pt"
# Settings a --resume may change: when to stop, and bookkeeping that does not alter the trajectory.
RESUMABLE_CHANGES = ("max_steps", "time_budget_min", "extra")
METRICS = "metrics.jsonl"

# Values the ImageNet preset sets (unless the option is given explicitly on the command line).
# Sources: method.md sections 3-4 (paper scale; BYOL's released optimiser settings).
PRESETS = {
    "imagenet-1000ep": dict(
        arch="resnet50", stem="imagenet", width=1.0, batch_size=4096, epochs=1000.0, optimizer="lars",
        lr=0.3, lars_eta=1e-3, weight_decay=1.5e-6, warmup_epochs=10.0, ema_base=0.996, proj_hidden=4096, proj_dim=256,
        large_size=224, small_size=96, large_crops=2, small_crops=6, blur=True, mask_prob=0.1,
    ),
}


@dataclass
class PretrainConfig:
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
    # views
    large_crops: int = 2
    small_crops: int = 2
    large_size: int = 32
    small_size: int = 16
    large_scale_min: float = 0.08
    small_scale: tuple[float, float] = (0.05, 0.14)
    mask_prob: float = 0.1
    blur: bool = False
    # loss
    n_negatives: int = 10
    tau: float = 0.2
    alpha: float = 1.0
    beta: float = 1.0
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
    # filled in by the run
    extra: dict = field(default_factory=dict)


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
) -> artifacts.Artifact:
    """Train and commit a `pretrain` artifact. `step_callback(step)` runs after every optimizer step
    (tests use it to send SIGTERM at a chosen step). Under torchrun (RANK/WORLD_SIZE set) the run is
    data-parallel over the processes, cfg.batch_size being the global batch (relicv2_cli.distributed)."""
    _check_config(cfg)
    dev = options.resolve_device(device)
    ddp = distributed.setup(dev, dist_timeout, dist_sampling)  # identity context on one process
    dev = ddp.device
    ddp.check_batch(cfg.batch_size)
    if cfg.precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RelicError("this GPU does not support bf16; use --precision fp32")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg.seed)

    dataset = load_dataset(cfg.spec, limit_train=cfg.limit_train, limit_test=cfg.limit_test,
                           image_size=cfg.image_size, seed=cfg.seed)
    train = dataset.train
    n_train, height = len(train.images), train.images.shape[1]
    if cfg.batch_size > n_train:
        raise RelicError(f"--batch-size {cfg.batch_size} is larger than the training split ({n_train} images)")
    parents = []
    masks = None
    if cfg.saliency:
        from relicv2_cli.stages.saliency import load_masks

        masks = torch.from_numpy(np.ascontiguousarray(load_masks(cfg.saliency, dataset, "train"))).to(dev)
        parents.append(artifacts.load_artifact(cfg.saliency, kind="saliency"))
    name = name or f"{cfg.method}-{cfg.spec.split(':')[0]}-{cfg.arch}"
    images = torch.from_numpy(train.images).permute(0, 3, 1, 2).contiguous().to(dev)  # uint8, decoded once
    labels = torch.from_numpy(train.labels).to(dev)

    steps_per_epoch = n_train // cfg.batch_size
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    eval_every = steps_per_epoch if cfg.eval_every is None else cfg.eval_every
    base_lr = scaled_lr(cfg.lr, cfg.batch_size) if cfg.optimizer != "adamw" else cfg.lr
    view_cfg = ViewConfig(
        large_crops=cfg.large_crops, small_crops=cfg.small_crops if cfg.method != "supervised" else 0,
        large_size=cfg.large_size, small_size=cfg.small_size, large_scale=(cfg.large_scale_min, 1.0),
        small_scale=tuple(cfg.small_scale), mask_prob=cfg.mask_prob, blur=cfg.blur,
    )

    # Networks: online (encoder + projector + predictor), EMA target, online linear probe.
    online = build_network(cfg.arch, cfg.width, cfg.stem, cfg.proj_hidden, cfg.proj_dim,
                           predictor=cfg.predictor and cfg.method != "supervised").to(dev)
    if cfg.method == "supervised":
        online.projector = nn.Linear(online.encoder.feature_dim, dataset.num_classes).to(dev)
    target = make_target(online).to(dev) if cfg.method != "supervised" else None
    probe = nn.Linear(online.encoder.feature_dim, dataset.num_classes).to(dev)
    if cfg.precision == "fp64":  # every parameter, activation and loss in float64
        online, probe = online.double(), probe.double()
        target = target.double() if target is not None else None
    online, target = ddp.sync_batchnorm(online), ddp.sync_batchnorm(target)  # BN over the global batch
    if dev.type == "cuda":
        online, probe = online.to(memory_format=torch.channels_last), probe
        target = target.to(memory_format=torch.channels_last) if target is not None else None
    optimizer = build_optimizer(cfg.optimizer, online, base_lr, cfg.weight_decay, lars_eta=cfg.lars_eta)
    probe_optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.0)
    train_online, train_probe = ddp.wrap(online), ddp.wrap(probe)  # DistributedDataParallel on several processes

    config = {**asdict(cfg), "image_size": height, "steps_per_epoch": steps_per_epoch,
              "total_steps": total_steps, "warmup_steps": warmup_steps, "base_lr_scaled": base_lr,
              "feature_dim": online.encoder.feature_dim, "num_classes": dataset.num_classes,
              "class_names": dataset.class_names}
    config["extra"] = {**config["extra"], **ddp.record()}  # world size: not compared on --resume
    # Rank 0 opens the staging directory; under torchrun --resume with nothing to resume starts afresh.
    staging, resume = ddp.open_staging(workdir, "pretrain", name, force=force, resume=resume)
    with staging:
        step, train_s = 0, 0.0  # train_s: seconds in optimizer steps (evaluation excluded), for --time-budget
        checkpoint_path = staging.dir / CHECKPOINT
        if resume:
            if not checkpoint_path.exists():
                raise RelicError(f"nothing to resume: no {CHECKPOINT} in {staging.dir}")
            state = torch.load(checkpoint_path, map_location=dev, weights_only=True)
            saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE_CHANGES}
            now = {k: v for k, v in json.loads(json.dumps(artifacts._jsonable(config))).items()
                   if k not in RESUMABLE_CHANGES}
            changed = sorted(k for k in now if saved.get(k) != now[k])
            if changed:
                raise RelicError(f"--resume with different settings than the interrupted run: {', '.join(changed)}")
            online.load_state_dict(state["online"])
            if target is not None:
                target.load_state_dict(state["target"])
            probe.load_state_dict(state["probe"])
            optimizer.load_state_dict(state["optimizer"])
            probe_optimizer.load_state_dict(state["probe_optimizer"])
            step, train_s = state["step"], state.get("train_s", 0.0)
            if ddp.is_main:
                _truncate_metrics(staging.dir / METRICS, step)

        def save_checkpoint() -> None:
            if not ddp.is_main:  # rank 0 alone writes; every rank holds the same weights
                return
            state = {"step": step, "train_s": train_s, "online": online.state_dict(), "probe": probe.state_dict(),
                     "target": target.state_dict() if target is not None else {},
                     "optimizer": optimizer.state_dict(), "probe_optimizer": probe_optimizer.state_dict(),
                     "config": artifacts._jsonable(config)}
            tmp = checkpoint_path.with_name(CHECKPOINT + ".tmp")
            torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, checkpoint_path)  # the previous checkpoint stays whole until this rename

        stop_signal: list[int] = []
        received = ddp.signal_list(stop_signal)  # merged into stop_signal on every process by ddp.sync_stop
        handlers = {sig: signal.signal(sig, lambda s, _f: received.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
        log = open(staging.dir / METRICS if ddp.is_main else os.devnull, "a")
        last_eval: dict = {}
        out_of_time = False
        t_start = time.perf_counter()
        try:
            with options.progress_bar(quiet or not ddp.is_main) as progress:
                task = progress.add_task(f"{cfg.method} {name}", total=last_step, completed=step, info="")
                while step < last_step and not stop_signal and not out_of_time:
                    t0 = time.perf_counter()
                    generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + step)
                    batch_idx = _batch_indices(step, steps_per_epoch, n_train, cfg.batch_size, cfg.seed).to(dev)
                    # Several processes: this rank's share of the batch and, per --dist-sampling, its generator.
                    generator, view_idx, batch_idx = ddp.split_batch(generator, batch_idx)
                    batch = images[view_idx]
                    views = ddp.local_views(make_views(batch, view_cfg, generator, masks[view_idx] if masks is not None else None))
                    lr = lr_at(step, total_steps, base_lr, warmup_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    rate = ema_rate(step, total_steps, cfg.ema_base)
                    t_data = time.perf_counter()
                    loss, stats, features, embeddings = _loss(cfg, train_online, target, views, labels[batch_idx],
                                                              generator, dev, pool=ddp.pools)
                    loss_value, stats = ddp.average(loss, stats)  # global-batch mean: the log and NaN check agree
                    if not torch.isfinite(loss_value):
                        raise RelicError(
                            f"loss became {loss_value.item()} at step {step}; stopped. The last good checkpoint is kept in "
                            f"{staging.dir} (--resume continues from it); try a lower --lr or --precision fp32"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if target is not None:
                        ema_update(target, online, rate)
                    probe_loss, probe_acc = _probe_step(train_probe, probe_optimizer, features, labels[batch_idx].repeat(cfg.large_crops))
                    step += 1
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t_end = time.perf_counter()
                    train_s += t_end - t0
                    # Every process stops at the same step: the budget is read on rank 0's clock.
                    out_of_time = cfg.time_budget_min is not None and ddp.agree(train_s >= 60 * cfg.time_budget_min)
                    final = step == last_step or out_of_time
                    if step % cfg.log_every == 0 or final or step == 1:
                        record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss_value.item(),
                                  **{k: float(v) for k, v in stats.items()}, "lr": lr, "ema_rate": rate,
                                  "embedding_std": embedding_std(embeddings), "probe_loss": probe_loss,
                                  "probe_train_top1": probe_acc, "images_per_s": cfg.batch_size / (t_end - t0),
                                  "data_fraction": (t_data - t0) / (t_end - t0)}
                        if eval_every and (step % eval_every == 0) or final:
                            last_eval = _evaluate(online.encoder, probe, dataset, height, dev, cfg, progress, ddp.encode(encode_images))
                            record.update(last_eval)
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        progress.update(task, info=f"loss {record['loss']:.3f}" + (
                            f" knn {last_eval['knn_top1']:.3f}" if last_eval else ""))
                    elif eval_every and step % eval_every == 0:
                        last_eval = _evaluate(online.encoder, probe, dataset, height, dev, cfg, progress, ddp.encode(encode_images))
                        log.write(json.dumps({"step": step, **last_eval}) + "\n")
                        log.flush()
                    progress.update(task, completed=step)
                    if step % cfg.checkpoint_every == 0:
                        save_checkpoint()
                    if step_callback is not None:
                        step_callback(step)
                    ddp.sync_stop(received, stop_signal)  # a signal on any process stops all after this step
        finally:
            log.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        save_checkpoint()
        ddp.barrier()  # the others wait for rank 0's checkpoint (torchrun stops everyone once one exits)
        if stop_signal:
            sig = stop_signal[0]
            options.console.print(f"stopped by {signal.Signals(sig).name} at step {step}/{last_step}; "
                                  f"checkpoint saved in {staging.dir}; continue with --resume")
            raise typer.Exit(128 + sig)

        if not ddp.is_main:
            return staging.commit()  # waits for rank 0's commit, then opens the artifact it wrote
        encoder_state = {k: v.detach().cpu().contiguous() for k, v in online.encoder.state_dict().items()}
        save_file(encoder_state, str(staging.dir / "backbone.safetensors"),
                  metadata={"arch": cfg.arch, "width": str(cfg.width), "stem": cfg.stem})
        torch.save(encoder_state, staging.dir / "backbone.pt")
        metrics = {"steps": step, "epochs": round(step / steps_per_epoch, 3), **last_eval,
                   "wall_s": round(time.perf_counter() - t_start, 1), "train_s": round(train_s, 1),
                   "stopped_by": "time_budget" if out_of_time else "steps"}
        final = _last_record(staging.dir / METRICS)
        metrics.update({k: final[k] for k in ("loss", "contrastive", "kl", "embedding_std", "images_per_s") if k in final})
        return staging.commit(config=config, parents=parents, dataset=dataset.record(), metrics=metrics)


def _check_config(cfg: PretrainConfig) -> None:
    options.check_choice("--method", cfg.method, METHODS)
    options.check_choice("--arch", cfg.arch, ARCHS)
    options.check_choice("--width", float(cfg.width), WIDTHS)
    options.check_choice("--stem", cfg.stem, STEMS)
    options.check_choice("--optimizer", cfg.optimizer, OPTIMIZERS)
    options.check_choice("--precision", cfg.precision, PRECISIONS)
    if cfg.large_crops < 1 or cfg.small_crops < 0:
        raise RelicError("need --large-crops >= 1 and --small-crops >= 0")
    if cfg.method == "byol" and cfg.large_crops < 2:
        raise RelicError("byol compares different views: needs --large-crops >= 2")
    if not 0 <= cfg.mask_prob <= 1:
        raise RelicError(f"--mask-prob must be in [0, 1], got {cfg.mask_prob}")
    if cfg.saliency and cfg.method == "supervised":
        raise RelicError("--saliency applies to self-supervised methods only")
    for flag, value in (("--batch-size", cfg.batch_size), ("--epochs", cfg.epochs), ("--tau", cfg.tau),
                        ("--checkpoint-every", cfg.checkpoint_every), ("--log-every", cfg.log_every)):
        if value <= 0:
            raise RelicError(f"{flag} must be positive, got {value}")
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise RelicError(f"--max-steps must be positive, got {cfg.max_steps}")
    if cfg.time_budget_min is not None and cfg.time_budget_min <= 0:
        raise RelicError(f"--time-budget must be positive, got {cfg.time_budget_min}")


def _batch_indices(step: int, steps_per_epoch: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The images of optimizer step `step`: a fresh permutation per epoch (seeded by seed and epoch),
    last partial batch dropped. Pure function of the step, so resume needs no sampler state."""
    epoch, within = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[within * batch : (within + 1) * batch]


def _loss(cfg, online, target, views, labels, generator, dev, pool=None):
    """The method's loss for one batch of views; returns (loss, stats, online large-view features
    for the probe, embeddings for the collapse monitor). `pool(online, target)`: extra relic_loss
    arguments drawing negatives from the all-gathered global batch (several processes)."""
    L, S = len(views.large), len(views.small)
    dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
    large = torch.cat(views.large).to(dtype)
    if dev.type == "cuda":
        large = large.contiguous(memory_format=torch.channels_last)
    with autocast(dev, cfg.precision):
        features, projection, prediction = online(large)
        if cfg.method == "supervised":
            loss = F.cross_entropy(at_least_fp32(projection), labels.repeat(L))
            return loss, {}, features, features
        small_pred = online(torch.cat(views.small).to(dtype))[2] if S else None
        with torch.no_grad():
            target_proj = target(large)[1]
    online_large = list(at_least_fp32(prediction).chunk(L))
    online_small = list(at_least_fp32(small_pred).chunk(S)) if S else []
    target_large = list(at_least_fp32(target_proj).chunk(L))
    if cfg.method == "relicv2":
        def pair(o, t):
            return relic_loss(o, t, cfg.n_negatives, cfg.tau, cfg.alpha, cfg.beta, generator=generator,
                              **(pool(o, t) if pool is not None else {}))

        loss, stats = multicrop_loss(pair, online_large, online_small, target_large, include_same_view=True)
    else:
        loss, stats = multicrop_loss(lambda o, t: (byol_loss(o, t), {}), online_large, online_small,
                                     target_large, include_same_view=False)
    return loss, stats, features, projection


def _probe_step(probe, probe_optimizer, features, labels) -> tuple[float, float]:
    """Online linear probe on detached features (solo-learn/BYOL monitor); never touches the encoder."""
    logits = probe(at_least_fp32(features.detach()))
    loss = F.cross_entropy(logits, labels)
    probe_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    probe_optimizer.step()
    return loss.item(), (logits.argmax(1) == labels).float().mean().item()


def _evaluate(encoder, probe, dataset, image_size, dev, cfg, progress, encode=encode_images) -> dict:
    """Weighted kNN (train split as memory) and online-probe accuracy on the test split. `encode`:
    encode_images, or its version sharded over processes (relicv2_cli.distributed)."""
    train_f = encode(encoder, dataset.train.images, image_size=image_size, device=dev,
                     precision=cfg.precision, progress=progress)
    test_f = encode(encoder, dataset.test.images, image_size=image_size, device=dev,
                    precision=cfg.precision, progress=progress)
    knn = knn_accuracy(train_f, dataset.train.labels, test_f, dataset.test.labels, dataset.num_classes,
                       cfg.knn_k, cfg.knn_temperature)
    with torch.no_grad():
        probe_pred = probe(test_f.to(dev, probe.weight.dtype)).argmax(1).cpu()
    probe_acc = (probe_pred == torch.from_numpy(dataset.test.labels)).float().mean().item()
    return {"knn_top1": knn, "probe_top1": probe_acc}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log has no duplicates."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    artifacts.atomic_write_bytes(path, ("\n".join(keep) + "\n").encode() if keep else b"")


def _last_record(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    full = [r for r in records if "loss" in r]
    return full[-1] if full else {}


def command(
    ctx: typer.Context,
    spec: options.Spec = "synthetic",
    method: Annotated[str, typer.Option(help="relicv2 (the paper), byol (normalised MSE, same views and EMA) or supervised (cross-entropy baseline).")] = "relicv2",
    saliency: Annotated[Path | None, typer.Option(help="Saliency artifact: remove the background of large crops with probability --mask-prob.")] = None,
    preset: Annotated[str | None, typer.Option(help="imagenet-1000ep: the paper's ImageNet settings (ResNet-50, batch 4096, 1000 epochs, LARS lr 0.3, wd 1.5e-6, EMA 0.996, 224/96 px crops); explicit options still win.")] = None,
    arch: options.Arch = "resnet18",
    width: options.Width = 1.0,
    stem: options.Stem = "cifar",
    proj_hidden: Annotated[int, typer.Option(help="Projector/predictor hidden size (byol: 4096).")] = 4096,
    proj_dim: Annotated[int, typer.Option(help="Projector/predictor output size (byol: 256).")] = 256,
    predictor: Annotated[bool, typer.Option(help="Use a predictor on the online side (choice, BYOL-style).")] = True,
    large_crops: Annotated[int, typer.Option(help="L, large crops per image (online and target) (choice).")] = 2,
    small_crops: Annotated[int, typer.Option(help="S, small crops per image (online only, never masked) (choice).")] = 2,
    large_size: Annotated[int, typer.Option(help="Side of large crops in pixels (paper: 224) (choice for CIFAR: 32).")] = 32,
    small_size: Annotated[int, typer.Option(help="Side of small crops in pixels (paper: 96) (choice for CIFAR: 16).")] = 16,
    large_scale_min: Annotated[float, typer.Option(help="Smallest area fraction of a large crop (byol: 0.08).")] = 0.08,
    small_scale_min: Annotated[float, typer.Option(help="Smallest area fraction of a small crop (choice).")] = 0.05,
    small_scale_max: Annotated[float, typer.Option(help="Largest area fraction of a small crop (choice).")] = 0.14,
    mask_prob: Annotated[float, typer.Option(help="p_m, probability that a large crop comes from the background-removed image (choice, paper ~0.1).")] = 0.1,
    blur: Annotated[bool, typer.Option(help="Gaussian blur in the views (off by default: at 32 px it destroys the image) (byol: on at 224 px).")] = False,
    n_negatives: Annotated[int, typer.Option(help="n_e, random negatives per anchor (choice).")] = 10,
    tau: Annotated[float, typer.Option(help="Temperature of the similarity softmax (choice).")] = 0.2,
    alpha: Annotated[float, typer.Option(help="Weight of the contrastive term (choice).")] = 1.0,
    beta: Annotated[float, typer.Option(help="Weight of the KL invariance term (choice).")] = 1.0,
    optimizer: Annotated[str, typer.Option(help="lars, sgd or adamw (byol: lars).")] = "lars",
    batch_size: options.BatchSize = 256,
    epochs: options.Epochs = 100.0,
    max_steps: options.MaxSteps = None,
    time_budget: Annotated[float | None, typer.Option(help="Stop after this many minutes spent in training steps (evaluation and checkpoints excluded), as --max-steps does; the schedule still spans --epochs, so choose --epochs to fit the budget.")] = None,
    lr: Annotated[float, typer.Option(help="Base learning rate; lars/sgd use lr * batch / 256, adamw uses it as is (choice for CIFAR: 1.0; paper 0.2-0.3).")] = 1.0,
    lars_eta: Annotated[float, typer.Option(help="LARS trust coefficient (choice for small data: 0.02, as solo-learn's CIFAR recipes; byol/paper: 1e-3).")] = 0.02,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (not on biases and norm parameters) (choice for CIFAR: 1e-5; paper 1.5e-6).")] = 1e-5,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up epochs before the cosine decay (byol: 10).")] = 10.0,
    ema_base: Annotated[float, typer.Option(help="gamma_base of the target EMA, rises to 1 by a cosine (0.99 short runs; paper 0.996).")] = 0.99,
    precision: Annotated[str, typer.Option(help="bf16 (autocast), fp32, or fp64 (everything in float64: slow; for exactness checks such as the multi-process tests).")] = "bf16",
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic kernels (a resumed run then ends with the same weights).")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps (also at the end and on SIGTERM/SIGINT).")] = 500,
    eval_every: Annotated[int | None, typer.Option(help="kNN + probe accuracy on the test split every N steps (default: once per epoch; 0: only at the end).")] = None,
    log_every: Annotated[int, typer.Option(help="Write a metrics.jsonl line every N steps.")] = 10,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same --name from its checkpoint (under torchrun: start afresh when there is none yet, so --max-restarts can repeat the command).")] = False,
    dist_timeout: Annotated[float, typer.Option(help="torchrun runs: seconds a process waits for the others in a collective before failing with an error (a dead or hung peer) (choice).")] = distributed.DEFAULT_TIMEOUT_S,
    dist_sampling: Annotated[str, typer.Option(help="torchrun runs: local (each process draws the views and negatives of its own share from a (seed, step, rank) generator) or global (every process draws those of the global batch and keeps its share: same result as one process, costs the augmentation of the global batch on each) (choice).")] = "local",
    limit_train: options.LimitTrain = None,
    limit_test: options.LimitTest = None,
    image_size: options.ImageSize = None,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: options.Name = None,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    force: options.Force = False,
    quiet: options.Quiet = False,
) -> None:
    """Pre-train a ResNet with RELICv2 (or BYOL / supervised) and write a `pretrain` artifact."""
    values = dict(locals())
    if preset is not None:
        if preset not in PRESETS:
            raise RelicError(f"unknown --preset {preset!r}; valid: {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            if ctx.get_parameter_source(key).name == "DEFAULT":  # explicit options win over the preset
                values[key] = value
    values["time_budget_min"] = values.pop("time_budget")
    values["small_scale"] = (values.pop("small_scale_min"), values.pop("small_scale_max"))
    values["saliency"] = str(saliency) if saliency else None
    run_options = {k: values.pop(k) for k in ("workdir", "name", "device", "force", "resume", "quiet",
                                              "dist_timeout", "dist_sampling")}
    for key in ("ctx", "preset"):
        values.pop(key)
    cfg = PretrainConfig(**values, extra={"preset": preset})
    art = run_pretrain(cfg, **run_options)
    if not distributed.is_main_process():  # torchrun: rank 0 prints the summary and the path
        return
    if not quiet:
        metrics = art.metrics
        options.console.print(
            f"{cfg.method}: {metrics['steps']} steps, loss {metrics.get('loss', float('nan')):.4f}, "
            f"kNN top-1 {metrics.get('knn_top1', float('nan')):.3f}, probe top-1 {metrics.get('probe_top1', float('nan')):.3f}"
        )
    options.finish(art.path)
