"""Data-parallel pretraining on PyTorch's own engine: torchrun + DistributedDataParallel.

`torchrun --nproc_per_node=N -m relicv2_cli pretrain ...` starts N copies of the stage; each finds
RANK / WORLD_SIZE / LOCAL_RANK in its environment and `setup()` joins the process group (gloo on CPU,
nccl on GPU, with a timeout). Without those variables (or with WORLD_SIZE=1) `setup()` returns a
context whose every method is the identity, so the single-process stage runs exactly as before.

What the context does for the training loop (docs/distributed.md):
- batch: `--batch-size` is the GLOBAL batch; step k's batch is the same global permutation slice as
  on one process and rank r keeps rows r*B/N..(r+1)*B/N (a distributed sampler, reshuffled per epoch,
  that needs no state to resume);
- views and negatives (`sampling`):
  - "local": each process draws the views of its own images from a generator seeded by
    (seed, step, rank) and its anchors' negative scores from the same generator;
  - "global": each process draws the views of the whole global batch from the shared (seed, step)
    generator and keeps its share, and draws the negative scores of every global anchor and keeps its
    rows (`sample_negatives(global_rows=True)`). The run then computes what one process with the
    whole batch computes, whatever the number of processes, at the cost of augmenting the global
    batch on every process;
  in both modes the candidates (negatives) come from the all-gathered global batch of target and
  online embeddings, so an anchor on rank 0 can draw a negative that lives on rank 1;
- BatchNorm: synchronised in the online and the target network (`nn.SyncBatchNorm` on GPU,
  `DistBatchNorm` below on CPU, where torch's SyncBatchNorm refuses to run);
- gradients: DistributedDataParallel averages them; every loss is a mean over the local anchors, so
  the average over processes is the gradient of the mean over the global batch;
- rank 0 alone writes checkpoints, metrics and the artifact; the others wait for it at barriers;
- stopping: a SIGTERM/SIGINT on any process and rank 0's time budget are merged into every process
  at the end of each step (one MAX all-reduce of two integers, `stop_vote`), so all stop after the
  same step and rank 0 checkpoints;
- failures: a collective that fails (a peer died: its socket closed) or waits longer than the
  timeout becomes a RelicError naming the likely cause instead of a hang.
"""

from __future__ import annotations

import datetime
import functools
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import typer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from relicv2_cli import artifacts
from relicv2_cli.errors import RelicError

SAMPLINGS = ("local", "global")
DEFAULT_TIMEOUT_S = 300.0
# Fragments of the errors gloo/nccl/c10d raise when a peer is gone or a collective timed out.
_PEER_FAILURE_HINTS = ("gloo", "nccl", "c10d", "connection closed", "connection reset", "timed out",
                       "broken pipe", "socket")


def torchrun_env() -> dict[str, int] | None:
    """RANK, WORLD_SIZE and LOCAL_RANK as set by torchrun (or by hand), or None when absent."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
                "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}
    except ValueError as e:
        raise RelicError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from e


def is_main_process() -> bool:
    """True on rank 0 and in a plain single-process run (rank read from the environment)."""
    env = torchrun_env()
    return env is None or env["rank"] == 0


# ---------------------------------------------------------------------------------------------------
# Synchronised BatchNorm for CPU (gloo)


class DistBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics span every process of the default group.

    Each process computes its per-channel mean and (biased, two-pass) variance and counts its
    samples; one differentiable all-gather (PyTorch's functional collective, whose backward
    reduce-scatters the gradient) brings every process's three, and Chan's parallel formula
    var = sum_r n_r (var_r + (mean_r - mean)^2) / N combines them (no E[x^2] - E[x]^2 cancellation
    when the mean is large against the spread). The global mean and variance normalise the local
    rows. Running statistics are updated like BatchNorm's (unbiased variance, `momentum`, cumulative
    average when momentum is None), so they stay identical on every process. The result equals
    BatchNorm on the concatenation of all processes' batches up to float rounding (tested in float64
    to 1e-9). In eval mode, or without a process group of more than one process, it is plain
    BatchNorm. Works for any input (N, C, *) like BatchNorm1d/2d/3d.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and several):
            return super().forward(x)
        import torch.distributed._functional_collectives as fcol  # autograd-aware collectives

        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()  # statistics in >= fp32
        local_var, local_mean = torch.var_mean(xf, dims, correction=0)
        local = torch.cat([local_mean, local_var, xf.new_tensor([xf.numel() / c])])
        every = fcol.all_gather_single(local[None], 0, dist.group.WORLD)  # (world, 2C + 1)
        counts = every[:, 2 * c :]
        n = counts.sum()
        mean = (counts * every[:, :c]).sum(0) / n
        var = (counts * (every[:, c : 2 * c] + (every[:, :c] - mean) ** 2)).sum(0) / n
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module | None, device: torch.device) -> nn.Module | None:
    """Every BatchNorm of `module` synchronised across processes: torch's nn.SyncBatchNorm on CUDA,
    DistBatchNorm elsewhere. Parameters and buffers are reused (same names, same state_dict keys,
    requires_grad kept), so checkpoints load in single- and multi-process runs alike."""
    if module is None:
        return None
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_dist_bn(module)


def _to_dist_bn(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, DistBatchNorm):
        out = DistBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_dist_bn(child))
    return out


# ---------------------------------------------------------------------------------------------------
# The per-run context


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sampling: str = "local"
    timeout_s: float = DEFAULT_TIMEOUT_S
    elastic: bool = False  # launched by torchrun (its agent may restart us)
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT
    owns_group: bool = False
    stopping: bool = False  # a signal stopped the run: the processes are checkpointing and exiting

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- a training step's calls: shard the batch, gather the embeddings, average the loss, vote to stop

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise RelicError(f"--batch-size {batch_size} (the global batch) must be divisible by the number "
                             f"of processes ({self.world_size})")

    def shard(self, generator: torch.Generator, batch_idx: torch.Tensor):
        """(generator for views and negatives, indices to make views of, this rank's indices, the rows
        of those views this rank keeps).

        One process: (generator, batch, batch, all). "global": views of the whole batch from the shared
        generator, this rank keeping its rows. "local": a (seed, step, rank) generator and views of this
        rank's images only."""
        everything = slice(None)
        if not self.active:
            return generator, batch_idx, batch_idx, everything
        b = len(batch_idx) // self.world_size
        keep = slice(self.rank * b, (self.rank + 1) * b)
        mine = batch_idx[keep]
        if self.sampling == "global":
            return generator, batch_idx, mine, keep
        seed = (generator.initial_seed() * 1_000_033 + self.rank + 1) % (2**63)
        return torch.Generator(device=generator.device).manual_seed(seed), mine, mine, everything

    def gather(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The global batch of each (b, D) tensor (rank r's rows at r*b), in one all-gather; None on
        one process. relic_loss draws negatives from these pools."""
        if not self.active:
            return None
        local = torch.stack([t.detach() for t in tensors]).contiguous()  # (n, b, D)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return list(torch.stack(parts, dim=1).flatten(1, 2).unbind(0))  # n x (world * b, D)

    def average(self, loss: torch.Tensor, stats: dict) -> tuple[torch.Tensor, dict]:
        """Mean over processes of the loss and its logged terms (every process holds the same number
        of anchors, so this is the global-batch mean): for the log and a NaN check all agree on."""
        if not self.active:
            return loss.detach(), stats
        keys = sorted(stats)
        terms = [torch.as_tensor(stats[k]).double().to(loss.device) for k in keys]
        vec = torch.stack([loss.detach().double(), *terms])
        dist.all_reduce(vec)
        vec = vec / self.world_size
        return vec[0], {k: vec[i + 1] for i, k in enumerate(keys)}

    def stop_vote(self, received: list[int], out_of_time: bool) -> tuple[int, bool]:
        """(signal, out_of_time) every process agrees on after a step, in one collective: a signal
        received by any process stops all; the time budget is read on rank 0's clock."""
        if not self.active:
            return (received[0] if received else 0), out_of_time
        flags = [max(received, default=0), int(out_of_time) if self.is_main else 0]
        votes = torch.tensor(flags, dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        signum, out_of_time = int(votes[0].item()), bool(votes[1].item())
        self.stopping = self.stopping or signum != 0
        return signum, out_of_time

    # -- modules ------------------------------------------------------------------------------------

    def sync_batchnorm(self, module: nn.Module | None) -> nn.Module | None:
        return convert_sync_batchnorm(module, self.device) if self.active else module

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel around `module` (the module itself on one process). Buffers are
        not re-broadcast every forward: synchronised BatchNorm keeps them equal on every process."""
        if not self.active:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)

    def barrier(self) -> None:
        """Wait for every process. When a signal stopped the run, further SIGTERM/SIGINT are ignored
        from here on: torchrun signals the processes still alive as soon as the first one exits, and a
        process already on its way out should still exit with 128 + signal, not be killed."""
        if not self.active:
            return
        if self.stopping:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
        dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def encode(self, encode_fn):
        """`encode_fn(encoder, images, **kw)` run on this rank's contiguous share of the images, the
        features all-gathered: evaluation (kNN, probe) costs 1/N of the time on every process."""
        if not self.active:
            return encode_fn

        @functools.wraps(encode_fn)
        def sharded(encoder, images, **kw):
            n = len(images)
            if n < self.world_size:
                return encode_fn(encoder, images, **kw)
            rows = [shard_rows(n, r, self.world_size) for r in range(self.world_size)]
            sizes = [hi - lo for lo, hi in rows]
            lo, hi = rows[self.rank]
            local = encode_fn(encoder, images[lo:hi], **kw)
            padded = local.new_zeros((max(sizes), *local.shape[1:]))
            padded[: len(local)] = local
            padded = padded.to(self._comm_device)
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
            return torch.cat([p[:s].cpu() for p, s in zip(parts, sizes, strict=True)])

        return sharded

    # -- artifact directory ---------------------------------------------------------------------------

    def record(self) -> dict:
        """What the manifest's config.extra records about the processes (nothing on one process)."""
        return {"world_size": self.world_size, "dist_sampling": self.sampling} if self.active else {}

    def open_staging(self, workdir: Path, kind: str, name: str, *, force: bool, resume: bool):
        """(staging, resume): rank 0 opens the artifact's staging directory, the others get a stand-in
        that points at the same directory and whose commit waits for rank 0's. An error on rank 0
        (artifact exists, nothing to resume, ...) is raised on every process.

        Under torchrun, `--resume` with nothing to resume (first attempt, or a crash before the first
        checkpoint) starts from step 0 instead of failing, so that `--max-restarts` can repeat one
        command line; `resume` in the result says whether there is a checkpoint to load."""
        message, staging, resume_now = None, None, resume
        if self.is_main:
            try:
                staging, resume_now = self._open_main(workdir, kind, name, force=force, resume=resume)
            except RelicError as e:
                message = str(e)
        if not self.active:
            if message is not None:
                raise RelicError(message)
            return staging, resume_now
        box = [message, resume_now, str(staging.dir) if staging else None,
               str(staging.final) if staging else None]
        dist.broadcast_object_list(box, src=0)
        message, resume_now, staging_dir, final = box
        if message is not None:
            raise RelicError(message)
        if self.is_main:
            return _LeaderStaging(staging, self), resume_now
        return _FollowerStaging(Path(staging_dir), Path(final), self), resume_now

    def _open_main(self, workdir: Path, kind: str, name: str, *, force: bool, resume: bool):
        if not (resume and self.elastic):
            return artifacts.Staging(workdir, kind, name, force=force, resume=resume, resumable=True,
                                     checkpoint=artifacts.CHECKPOINT), resume
        # Same naming rule as artifacts.Staging: WORKDIR/KIND/.NAME.partial
        partial = artifacts.artifact_path(workdir, kind, name).parent / f".{name}.partial"
        if not partial.exists():
            return artifacts.Staging(workdir, kind, name, force=force, resume=False, resumable=True,
                                     checkpoint=artifacts.CHECKPOINT), False
        staging = artifacts.Staging(workdir, kind, name, force=force, resume=True, resumable=True,
                                    checkpoint=artifacts.CHECKPOINT)
        if (staging.dir / artifacts.CHECKPOINT).exists():
            return staging, True
        # lines of an attempt that never checkpointed
        (staging.dir / artifacts.METRICS).unlink(missing_ok=True)
        return staging, False

    def peer_failure_message(self, error: BaseException) -> str:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"process {self.rank} of {self.world_size} lost contact with the others ({first}). Another "
                f"process most likely died (see the first error in the log) or hung for more than "
                f"--dist-timeout {self.timeout_s:g} s; steps after the last checkpoint are lost, --resume "
                f"(or torchrun --max-restarts with --resume) continues from it")


class _LeaderStaging:
    """Rank 0's artifacts.Staging; commit also releases the processes waiting for it."""

    def __init__(self, staging: artifacts.Staging, ctx: DistContext):
        self._staging, self._ctx = staging, ctx

    def __getattr__(self, name):
        return getattr(self._staging, name)

    def __enter__(self):
        self._staging.__enter__()
        return self

    def __exit__(self, *exc):
        return self._staging.__exit__(*exc)

    def commit(self, **kwargs) -> artifacts.Artifact:
        art = self._staging.commit(**kwargs)
        self._ctx.barrier()
        return art


class _FollowerStaging:
    """The staging directory as seen by ranks > 0: read-only; commit waits for rank 0's commit and
    opens the artifact it wrote."""

    def __init__(self, staging_dir: Path, final: Path, ctx: DistContext):
        self.dir, self.final, self._ctx = staging_dir, final, ctx

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def commit(self, **_kwargs) -> artifacts.Artifact:
        self._ctx.barrier()
        return artifacts.load_artifact(self.final)


# ---------------------------------------------------------------------------------------------------
# Set-up and tear-down

_ACTIVE: DistContext | None = None


def setup(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S, sampling: str = "local") -> DistContext:
    """The run's DistContext; joins the process group when torchrun started several processes.

    gloo on CPU, nccl on CUDA (each process on cuda:LOCAL_RANK). `timeout_s` bounds every collective,
    so a hung or dead peer turns into an error instead of a hang."""
    global _ACTIVE
    if sampling not in SAMPLINGS:
        raise RelicError(f"--dist-sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
    if timeout_s <= 0:
        raise RelicError(f"--dist-timeout must be positive, got {timeout_s}")
    env = torchrun_env()
    elastic = "TORCHELASTIC_RESTART_COUNT" in os.environ
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if env is None or env["world_size"] <= 1:
        ctx = DistContext(device=device, sampling=sampling, timeout_s=timeout_s, elastic=elastic,
                          restart=restart)
        _ACTIVE = ctx
        return ctx
    rank, world, local = env["rank"], env["world_size"], env["local_rank"]
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RelicError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                             f"use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            _init_process_group(backend, rank, world, datetime.timedelta(seconds=timeout_s), restart)
        except Exception as e:  # noqa: BLE001  rendezvous failures come as several exception types
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise RelicError(f"process {rank} of {world} could not join the process group at {where} "
                             f"within {timeout_s:g} s "
                             f"({str(e).strip().splitlines()[0] if str(e).strip() else e!r})") from e
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise RelicError("an existing process group does not match RANK/WORLD_SIZE")
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, device=device, sampling=sampling,
                      timeout_s=timeout_s, elastic=elastic, restart=restart, owns_group=owns)
    _ACTIVE = ctx
    return ctx


def _init_process_group(backend: str, rank: int, world: int, timeout: datetime.timedelta,
                        restart: int) -> None:
    """init_process_group from torchrun's environment, robust to torchrun's restarts on one node.

    torchrun's agent hosts one TCP store (MASTER_ADDR:MASTER_PORT) that the workers share and that
    outlives a failed attempt; the next attempt can read the previous one's gloo/nccl addresses from
    it and fail to connect or hang (PyTorch issues #135712, #167288). On one node every worker sees
    the same restart count, so each attempt gets its own key prefix in that store. On several nodes
    the counts can differ between nodes: there, start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    (rank 0 prints a reminder when --max-restarts is used without it)."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    one_node = os.environ.get("GROUP_WORLD_SIZE", "1") == "1"
    if agent_store and one_node:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"relicv2/attempt_{restart}", store),
                                rank=rank,
                                world_size=world, timeout=timeout)
        return
    if agent_store and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 and rank == 0:
        print("warning: torchrun --max-restarts on several nodes: set "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
              "torchrun's environment, or a restart may fail to connect (PyTorch issues #135712, #167288)",
              file=sys.stderr)
    dist.init_process_group(backend, timeout=timeout)


def shutdown() -> None:
    """Leave the process group if `setup` joined it."""
    global _ACTIVE
    ctx, _ACTIVE = _ACTIVE, None
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  a dead peer can make the tear-down fail too; nothing left to do
            pass


def is_peer_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error).lower()
    return any(hint in text for hint in _PEER_FAILURE_HINTS)


def entry_point(fn):
    """Decorator for a stage's run function: turns a failed collective into a RelicError that names
    the likely cause, and leaves the process group on the way out."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RelicError, typer.Exit):  # typer.Exit is a RuntimeError too: a deliberate exit (signal)
            raise
        except Exception as e:
            ctx = _ACTIVE
            if ctx is not None and ctx.active and is_peer_failure(e):
                raise RelicError(ctx.peer_failure_message(e)) from e
            raise
        finally:
            shutdown()

    return wrapper


def shard_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows lo..hi of rank `rank` when n rows are split contiguously into world_size parts."""
    return n * rank // world_size, n * (rank + 1) // world_size
