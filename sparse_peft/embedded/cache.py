"""A build cache for the embedded models: each entry is built once, under a lock, in stages that survive an
interruption, and verified against its recorded checksums on every use.

An entry is a folder ``<cache>/<name>`` holding the built files and ``build.json`` (metadata, plus the size and
sha256 of every file). While it is built it lives in ``<name>.partial``, where ``stages.json`` records each
finished stage and the files it wrote; a build that was killed resumes after its last intact stage. A finished
entry whose files do not match ``build.json`` (truncated, edited, half-deleted) is rebuilt, never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

BUILD_FILE = "build.json"
STAGES_FILE = "stages.json"
_verified: dict[Path, tuple[tuple[str, int, int], ...]] = {}
"""Entries verified by this process, with each file's (name, size, mtime): hashing 0.5 GB once is enough."""


@dataclass(frozen=True)
class Stage:
    """One resumable step of a build: ``build(folder)`` writes its files into ``folder`` (the earlier stages'
    files are already there) and returns metadata for ``build.json``."""

    name: str
    build: Callable[[Path], dict[str, Any]]


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_PEFT_CACHE", Path.home() / ".cache" / "sparse-peft"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(folder: Path, names: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    stats = [(name, (folder / name).stat()) for name in names]
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


def _files_match(folder: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """None when every listed file exists with its recorded size and sha256, else what is wrong."""
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["size"]:
            return f"{name} has {path.stat().st_size} bytes, {record['size']} were written"
        if file_sha256(path) != record["sha256"]:
            return f"{name} does not match its sha256"
    return None


def verify(folder: Path) -> str | None:
    """None when ``folder`` is a complete, intact entry; otherwise the reason it is not."""
    try:
        build = json.loads((folder / BUILD_FILE).read_text())
        files = build["files"]
        names = sorted(files)
        if _verified.get(folder) == _fingerprint(folder, names):
            return None
    except FileNotFoundError:
        return f"{BUILD_FILE} or a file it lists is missing"
    except (ValueError, KeyError, TypeError) as error:
        return f"{BUILD_FILE} is unreadable ({error})"
    problem = _files_match(folder, files)
    if problem is None:
        _verified[folder] = _fingerprint(folder, names)
    return problem


def _record(folder: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in names}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write-then-rename: a reader sees the old file or the new one, never half of one."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(scratch, path)


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and p.name != STAGES_FILE and p.suffix != ".tmp"}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_build(
    name: str, stages: Sequence[Stage], metadata: dict[str, Any], progress: bool = True, description: str = ""
) -> Path:
    """The folder of cache entry ``name``, built from ``stages`` unless an intact one exists. Concurrent callers
    (threads or processes) wait for one build; ``metadata`` (what the entry was built from) goes to
    ``build.json``."""
    root = cache_dir()
    target = root / name
    if verify(target) is None:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{name}.lock"):
        problem = verify(target)
        if problem is None:  # another caller built it while we waited
            return target
        if target.exists():
            warnings.warn(f"the cached {target} is damaged ({problem}); rebuilding it", stacklevel=2)
            shutil.rmtree(target)
        partial = root / f"{name}.partial"
        partial.mkdir(exist_ok=True)
        done = _finished_stages(partial)
        results: dict[str, Any] = {}
        bar = tqdm(stages, desc=description or f"building {name}", disable=not progress, unit="stage")
        for stage in bar:
            bar.set_postfix_str(stage.name, refresh=True)
            if stage.name in done:
                results[stage.name] = done[stage.name]["result"]
                continue
            before = _listing(partial)
            results[stage.name] = stage.build(partial)
            written = sorted(_listing(partial) - before)
            done[stage.name] = {"files": _record(partial, written), "result": results[stage.name]}
            _write_json(partial / STAGES_FILE, done)
        files = {k: v for stage in done.values() for k, v in stage["files"].items()}
        _write_json(partial / BUILD_FILE, {**metadata, "stages": results, "files": files})
        (partial / STAGES_FILE).unlink()
        partial.rename(target)
    return target


def _finished_stages(partial: Path) -> dict[str, Any]:
    """The stages of an interrupted build whose files are intact (the others, and stray files, are discarded)."""
    try:
        done = json.loads((partial / STAGES_FILE).read_text())
    except (FileNotFoundError, ValueError):
        done = {}
    intact: dict[str, Any] = {}
    for stage_name, stage in done.items():
        if _files_match(partial, stage["files"]) is not None:
            break  # later stages built on this one: redo from here
        intact[stage_name] = stage
    keep = {name for stage in intact.values() for name in stage["files"]}
    for path in partial.iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if intact:
        _write_json(partial / STAGES_FILE, intact)
    return intact
