"""A disk cache whose entries are whole directories, built atomically and verified before they are trusted."""

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def cache_root() -> Path:
    """`$MINORSFT_TRL_CACHE`, else `$XDG_CACHE_HOME/minorsft_trl`, else `~/.cache/minorsft_trl`."""
    if "MINORSFT_TRL_CACHE" in os.environ:
        return Path(os.environ["MINORSFT_TRL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "minorsft_trl"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(entry: Path, key: dict[str, Any]) -> bool:
    """Whether `entry` was built for `key` and every file still has the content it was written with."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("key") != key:
        return False
    files = manifest.get("files", {})
    return bool(files) and all(
        (entry / name).is_file() and file_sha256(entry / name) == sha for name, sha in files.items()
    )


def cached_directory(
    entry: Path,
    key: dict[str, Any],
    build: Callable[[Path], None],
    verify: Callable[[Path], bool] | None = None,
) -> Path:
    """Return `entry` if it holds a complete build for `key` (that `verify`, if given, accepts); else build it and
    return it.

    `build(directory)` writes the files into a fresh temporary directory next to `entry`, which replaces `entry` only
    once the build has finished and its manifest (the key and a sha256 per file) is written: an interrupted build
    leaves nothing that a later call would trust, and a corrupt, truncated or stale entry is rebuilt.
    """
    entry = Path(entry)
    if is_complete(entry, key) and (verify is None or verify(entry)):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = entry.parent / f".{entry.name}.{uuid.uuid4().hex}.partial"
    staging.mkdir()
    try:
        build(staging)
        files = {
            str(path.relative_to(staging)): file_sha256(path) for path in sorted(staging.rglob("*")) if path.is_file()
        }
        (staging / MANIFEST).write_text(json.dumps({"key": key, "files": files}, indent=2, sort_keys=True))
        if entry.exists():
            shutil.rmtree(entry)
        staging.rename(entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry
