"""Versioned artifacts on disk: one directory WORKDIR/KIND/NAME with a manifest.json.

Writes are atomic: a stage builds its artifact in a staging directory beside the final one
(WORKDIR/KIND/.NAME.partial), then `commit()` hashes every file, writes the manifest, fsyncs and
renames the directory into place. A crash leaves at most the staging directory, never a half
artifact under the final name. Resumable stages keep the staging directory on failure so that
`--resume` can continue from what it holds.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from relicv2_cli import __version__
from relicv2_cli.errors import RelicError

FORMAT = "relicv2-artifact"
SCHEMA = 1
KINDS = ("dataset", "saliency", "pretrain", "features", "linear", "semi", "transfer", "neighbors", "ratios")
MANIFEST = "manifest.json"
# Files of a resumable run (pretrain) in its staging directory.
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_HASHED: dict[tuple, str] = {}


def verified_sha256(path: Path) -> str:
    """sha256_file, computed once per process for a file that has not changed since (same inode,
    size and modification time), so stages can check every payload they open at little cost."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def manifest_digest(manifest: dict) -> str:
    """Digest of the manifest without its own `digest` field; it covers every file hash too."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def tool_record() -> dict:
    """The code that makes an artifact: the package version and the git commit (None outside git)."""
    return {"version": __version__, "git": _git_revision()}


def tool_differences(art: Artifact) -> list[str]:
    """How the code that made `art` differs from this code, e.g. ["git a1b2c3d -> e4f5a6b"]."""
    then, now = art.manifest.get("tool") or {}, tool_record()
    return [f"{key} {then.get(key)} -> {now[key]}" for key in ("version", "git") if then.get(key) != now[key]]


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def no_space(error: BaseException | None) -> bool:
    """Whether an error means the disk is full (h5py puts errno 28 in a long multi-line message), also
    when another error replaced it while unwinding: torch.save's zip writer raises "unexpected pos"
    from its __exit__, with the full disk's OSError as its context."""
    for _ in range(8):  # a short chain; guards against cycles
        if error is None:
            return False
        if isinstance(error, OSError) and (error.errno == errno.ENOSPC or "errno = 28" in str(error)):
            return True
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False


def no_space_error(path: Path) -> RelicError:
    return RelicError(f"no space left on device writing {path}; free some space and rerun")


def _written_file(error: BaseException) -> str | None:
    """The file an OSError was about: its `filename`, or the one h5py names in its message."""
    if getattr(error, "filename", None):
        return str(error.filename)
    found = re.search(r"filename = '([^']*)'", str(error))
    return found.group(1) if found else None


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write one file atomically: `write(f)` fills a temporary file in the same directory, which is
    fsynced and renamed over `path`, so `path` always holds a whole file. On any error the temporary
    file is removed; a full disk becomes a one-line RelicError naming `path`.

    Writers that take a file object write through Python, whose OSError carries the errno:
    `atomic_write(p, lambda f: torch.save(state, f))` (torch.save to a *path* reports a full disk
    as "unexpected pos" alone; to a file object the OSError is that error's context)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if no_space(e):
            raise no_space_error(path) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def load_torch_file(path: Path, map_location="cpu"):
    """torch.load(weights_only=True) with one-line errors: a file that holds Python objects other
    than tensors and containers is refused (torch's own text is several lines and advises
    weights_only=False, which would run the file's code)."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise RelicError(f"refused to load {path}: it holds Python objects, not only tensors{what}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise RelicError(f"cannot read {path} as a torch file (truncated or corrupt): {first}") from None


@dataclass
class Artifact:
    """A committed artifact: its directory and parsed manifest."""

    path: Path
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def file(self, name: str) -> Path:
        """The path of payload file `name`, after checking its size and sha256 against the manifest,
        so that no stage computes results from a damaged or replaced file."""
        path = self.path / name
        if not path.exists():
            raise RelicError(f"artifact {self.path} has no file {name!r}")
        entry = self.manifest.get("files", {}).get(name)
        if entry is None:
            raise RelicError(f"{path} is not listed in the manifest of {self.path}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise RelicError(f"{path} has {size} bytes, its manifest records {entry['bytes']}: damaged or "
                             f"replaced (relicv2 artifacts verify {self.path})")
        if verified_sha256(path) != entry["sha256"]:
            raise RelicError(f"{path}: sha256 differs from its manifest: damaged or replaced "
                             f"(relicv2 artifacts verify {self.path})")
        return path

    def sha256(self, name: str) -> str:
        """The sha256 of payload file `name`, checked against the manifest (for cache keys)."""
        self.file(name)
        return self.manifest["files"][name]["sha256"]

    def as_parent(self) -> dict:
        return {"kind": self.kind, "path": str(self.path.resolve()), "digest": self.digest}


def load_artifact(path: str | Path, kind: str | tuple[str, ...] | None = None) -> Artifact:
    """Open an artifact directory (or its manifest.json) and check format, schema and kind."""
    path = Path(path)
    if path.name == MANIFEST:
        path = path.parent
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise RelicError(f"artifact not found: {path} (no such directory)")
    if not manifest_path.exists():
        raise RelicError(f"not an artifact: {path} has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RelicError(f"corrupt manifest {manifest_path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise RelicError(f"{manifest_path}: expected format {FORMAT!r}, found {found!r}")
    if manifest.get("schema") != SCHEMA:
        raise RelicError(f"{manifest_path}: expected schema {SCHEMA}, found {manifest.get('schema')!r}")
    expected = (kind,) if isinstance(kind, str) else kind
    if expected is not None and manifest.get("kind") not in expected:
        raise RelicError(
            f"{path}: expected an artifact of kind {' or '.join(map(repr, expected))}, "
            f"found kind {manifest.get('kind')!r}"
        )
    if manifest.get("digest") != manifest_digest(manifest):
        raise RelicError(f"{manifest_path}: manifest digest does not match its content (edited by hand?)")
    return Artifact(path=path, manifest=manifest)


def verify_artifact(path: str | Path) -> list[str]:
    """Recheck every file hash; return a list of problems (empty when the artifact is intact)."""
    art = load_artifact(path)
    problems = []
    listed = art.manifest.get("files", {})
    for name, entry in listed.items():
        file_path = art.path / name
        if not file_path.exists():
            problems.append(f"{name}: missing")
        elif file_path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: size {file_path.stat().st_size} != recorded {entry['bytes']}")
        elif sha256_file(file_path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    for file_path in sorted(art.path.rglob("*")):
        rel = file_path.relative_to(art.path).as_posix()
        if file_path.is_file() and rel != MANIFEST and rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    return problems


def check_parent(parent: Artifact, recorded: dict) -> None:
    """Refuse to mix results when an input artifact changed after a child recorded it."""
    if recorded.get("digest") != parent.digest:
        raise RelicError(
            f"input {parent.path} changed since it was recorded (digest {parent.digest[:12]} "
            f"!= recorded {str(recorded.get('digest'))[:12]}); rerun the stage with --force"
        )


def artifact_path(workdir: Path, kind: str, name: str) -> Path:
    return Path(workdir) / kind / name


@dataclass
class Staging:
    """An artifact under construction. Use as a context manager, write files into `.dir`,
    then call `commit()`. On an exception the staging directory is removed, unless `resumable`,
    in which case it is kept for `--resume`; with `checkpoint` (a file name) it is kept only once it
    holds that file, and a leftover directory without it is replaced, as there is nothing to resume.
    A full disk inside the `with` block becomes a one-line RelicError naming the file."""

    workdir: Path
    kind: str
    name: str
    force: bool = False
    resume: bool = False
    resumable: bool = False
    checkpoint: str | None = None
    dir: Path = field(init=False)
    final: Path = field(init=False)
    metrics: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown artifact kind {self.kind!r}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise RelicError(f"invalid artifact name {self.name!r}")
        self.final = artifact_path(self.workdir, self.kind, self.name)
        self.dir = self.final.parent / f".{self.name}.partial"
        if self.final.exists() and not self.force:
            if self.resume and self.resumable and self.dir.exists():  # an interrupted --force run
                raise RelicError(f"artifact exists: {self.final}; --resume --force continues the interrupted "
                                 "run and replaces it")
            raise RelicError(f"artifact exists: {self.final} (use --force to replace it)")
        if self.dir.exists():
            if self.resume and self.resumable:
                return
            if self.resumable and not self.force and self._resumable_state():
                raise RelicError(
                    f"an interrupted run left {self.dir}; pass --resume to continue it or --force to restart"
                )
            shutil.rmtree(self.dir)
        elif self.resume:
            raise RelicError(f"nothing to resume: {self.dir} does not exist")
        self.dir.mkdir(parents=True)

    def __enter__(self) -> Staging:
        return self

    def _resumable_state(self) -> bool:
        return self.resumable and (self.checkpoint is None or (self.dir / self.checkpoint).exists())

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and self.dir.exists() and not self._resumable_state():
            shutil.rmtree(self.dir, ignore_errors=True)
        if exc is not None and no_space(exc):
            raise no_space_error(_written_file(exc) or self.dir) from None
        return False

    def commit(
        self,
        *,
        config: dict,
        parents: list[Artifact] = (),
        dataset: dict | None = None,
        metrics: dict | None = None,
        command: list[str] | None = None,
    ) -> Artifact:
        files = {}
        for file_path in sorted(self.dir.rglob("*")):
            if file_path.is_file():
                rel = file_path.relative_to(self.dir).as_posix()
                files[rel] = {"sha256": sha256_file(file_path), "bytes": file_path.stat().st_size}
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "schema": SCHEMA,
            "kind": self.kind,
            "name": self.name,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "tool": tool_record(),
            "command": command if command is not None else sys.argv,
            "config": jsonable(config),
            "parents": [p.as_parent() for p in parents],
            "dataset": dataset,
            "files": files,
            "metrics": jsonable({**self.metrics, **(metrics or {})}),
        }
        manifest["digest"] = manifest_digest(manifest)
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        _fsync_tree(self.dir)
        # Swap into place: move any old artifact aside first, so the final name always holds a whole one.
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.final, old)
        os.rename(self.dir, self.final)
        _fsync_dir(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return load_artifact(self.final)


def jsonable(value: Any) -> Any:
    """Configs hold Paths, tuples and numpy scalars; the manifest holds plain JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def list_artifacts(workdir: Path) -> list[Artifact | tuple[Path, str]]:
    """Every artifact below WORKDIR (any depth, e.g. runs/demo/pretrain/x), skipping staging and
    hidden directories; unreadable ones come back as (path, problem)."""
    found: list[Artifact | tuple[Path, str]] = []
    for manifest in sorted(Path(workdir).rglob(MANIFEST)):
        art_dir = manifest.parent
        if any(part.startswith(".") for part in art_dir.relative_to(workdir).parts):
            continue
        try:
            found.append(load_artifact(art_dir))
        except RelicError as e:
            found.append((art_dir, str(e)))
    return found


def lineage(art: Artifact, depth: int = 0, seen: set | None = None) -> list[tuple[int, Artifact | dict, str]]:
    """The chain of parents as (depth, artifact-or-record, status) rows, depth-first."""
    seen = seen if seen is not None else set()
    rows: list[tuple[int, Artifact | dict, str]] = [(depth, art, "")] if depth == 0 else []
    for record in art.manifest.get("parents", []):
        path = Path(record["path"])
        try:
            parent = load_artifact(path)
        except RelicError:
            rows.append((depth + 1, record, "missing"))
            continue
        status = "" if parent.digest == record["digest"] else "changed since recorded"
        rows.append((depth + 1, parent, status))
        if parent.digest not in seen:
            seen.add(parent.digest)
            rows.extend(lineage(parent, depth + 1, seen))
    return rows
