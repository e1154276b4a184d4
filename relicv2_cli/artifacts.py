"""Versioned artifacts on disk: one directory WORKDIR/KIND/NAME with a manifest.json.

Writes are atomic: a stage builds its artifact in a staging directory beside the final one
(WORKDIR/KIND/.NAME.partial), then `commit()` hashes every file, writes the manifest, fsyncs and
renames the directory into place. A crash leaves at most the staging directory, never a half
artifact under the final name. Resumable stages keep the staging directory on failure so that
`--resume` can continue from what it holds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relicv2_cli import __version__
from relicv2_cli.errors import RelicError

FORMAT = "relicv2-artifact"
SCHEMA = 1
KINDS = ("saliency", "pretrain", "features", "linear", "semi", "transfer", "neighbors", "ratios")
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """Digest of the manifest without its own `digest` field; it covers every file hash too."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a single file atomically (temp file in the same directory, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
        path = self.path / name
        if not path.exists():
            raise RelicError(f"artifact {self.path} has no file {name!r}")
        return path

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


def default_workdir() -> Path:
    return Path(os.environ.get("RELICV2_HOME", "runs"))


def artifact_path(workdir: Path, kind: str, name: str) -> Path:
    return Path(workdir) / kind / name


@dataclass
class Staging:
    """An artifact under construction. Use as a context manager, write files into `.dir`,
    then call `commit()`. On an exception the staging directory is removed, unless `resumable`,
    in which case it is kept for `--resume`."""

    workdir: Path
    kind: str
    name: str
    force: bool = False
    resume: bool = False
    resumable: bool = False
    dir: Path = field(init=False)
    final: Path = field(init=False)
    metrics: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown artifact kind {self.kind!r}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise RelicError(f"invalid artifact name {self.name!r}")
        self.final = artifact_path(self.workdir, self.kind, self.name)
        if self.final.exists() and not self.force:
            raise RelicError(f"artifact exists: {self.final} (use --force to replace it)")
        self.dir = self.final.parent / f".{self.name}.partial"
        if self.dir.exists():
            if self.resume and self.resumable:
                return
            if self.resumable and not self.force:
                raise RelicError(
                    f"an interrupted run left {self.dir}; pass --resume to continue it or --force to restart"
                )
            shutil.rmtree(self.dir)
        elif self.resume:
            raise RelicError(f"nothing to resume: {self.dir} does not exist")
        self.dir.mkdir(parents=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and self.dir.exists() and not self.resumable:
            shutil.rmtree(self.dir, ignore_errors=True)
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
            "tool": {"version": __version__, "git": _git_revision()},
            "command": command if command is not None else sys.argv,
            "config": _jsonable(config),
            "parents": [p.as_parent() for p in parents],
            "dataset": dataset,
            "files": files,
            "metrics": _jsonable({**self.metrics, **(metrics or {})}),
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


def _jsonable(value: Any) -> Any:
    """Configs hold Paths, tuples and numpy scalars; the manifest holds plain JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
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
