"""A disk cache whose entries are whole directories, built atomically and verified before they are trusted.

Several processes may use one entry at once: the ranks of a distributed launch, or the runs of a sweep sharing
`~/.cache/minorsft_trl`. A lock file next to each entry (`.<name>.lock`) serialises them: checks hold it shared, a
build and the replacement of the entry hold it exclusively, so a check never sees an entry half replaced and a process
that finds another building waits for that build instead of repeating it.
"""

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no locking, the cache is then only safe for one process at a time
    fcntl = None

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
        if manifest.get("key") != key:
            return False
        files = manifest.get("files", {})
        return bool(files) and all(
            (entry / name).is_file() and file_sha256(entry / name) == sha for name, sha in files.items()
        )
    except (OSError, ValueError):
        return False


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

    Safe for concurrent processes: the check runs under a shared lock, the build and the replacement under an
    exclusive one, and the replacement swaps the directories in one step where the system can (Linux), so a process
    reading `entry` after this returns finds a complete entry rather than a missing or half-deleted one. What it finds
    is the entry for `key` as long as no other process rebuilds it meanwhile, which only a differing key, a damaged
    entry or a `verify` that rejects it makes them do.
    """
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = entry.parent / f".{entry.name}.lock"
    with _locked(lock, exclusive=False):
        rejected = _identity(entry)
        if _trusted(entry, key, verify):
            return entry
    with _locked(lock, exclusive=True):
        # Another process may have built the entry while this one waited: check it again, unless it is the very
        # directory just rejected (`verify` can be as costly as a build, and a rejection must lead to a rebuild)
        if _identity(entry) != rejected and _trusted(entry, key, verify):
            return entry
        staging = entry.parent / f".{entry.name}.{uuid.uuid4().hex}.partial"
        staging.mkdir()
        try:
            build(staging)
            files = {
                str(path.relative_to(staging)): file_sha256(path)
                for path in sorted(staging.rglob("*"))
                if path.is_file()
            }
            (staging / MANIFEST).write_text(json.dumps({"key": key, "files": files}, indent=2, sort_keys=True))
            _install(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the failed build, or the entry it replaced
    return entry


def _trusted(entry: Path, key: dict[str, Any], verify: Callable[[Path], bool] | None) -> bool:
    return is_complete(entry, key) and (verify is None or verify(entry))


def _identity(directory: Path) -> tuple[int, int, int] | None:
    """Tells one directory at a path from the next one put there (a replaced entry gets a new inode and ctime)."""
    try:
        stat = os.stat(directory)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold an flock on the file `path`, and delete the file when done if no other process holds or awaits it, so a
    cache directory holds only entries between calls. Where locking is impossible (a read-only cache, a filesystem
    without flock) this goes on without a lock, as the cache did before."""
    fd = _acquire(path, exclusive)
    try:
        yield
    finally:
        if fd is not None:
            # Only a sole holder may delete the file: a shared one first tries to become exclusive, without waiting
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    os.unlink(path)
            os.close(fd)


def _acquire(path: Path, exclusive: bool) -> int | None:
    """The descriptor of the locked file at `path`, or None if it cannot be locked.

    Deleting lock files is safe because a lock counts only while its file is still the one at `path`: a process that
    locked a file another one deleted meanwhile tries again with the new one."""
    if fcntl is None:
        return None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _install(staging: Path, entry: Path) -> None:
    """Put the finished `staging` at `entry`. An entry it replaces ends up at `staging`, which the caller deletes."""
    try:
        staging.rename(entry)  # no entry yet (or an empty one)
        return
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if not _exchange(staging, entry):
        # Two renames leave a moment without `entry`: a check waits for the lock and never sees it, only a process
        # reading an entry it was handed earlier might
        aside = entry.parent / f".{entry.name}.{uuid.uuid4().hex}.old"
        entry.rename(aside)
        staging.rename(entry)
        aside.rename(staging)


def _renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the C library or the
    filesystem (e.g. NFS) cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
