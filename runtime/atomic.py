"""Atomic writes: a file or directory is written under a temporary name beside its place and renamed
there when complete, so a reader (or a run killed half-way) never sees a partial one. A directory
that already exists (an engine, a training checkpoint) is exchanged with the new one in a single
step, so a process killed at any moment (SIGKILL, power loss) leaves the old or the new directory
in place, never neither and never a mix."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; when the block ends it becomes `path`
    (replace=False: unless `path` exists by then, e.g. written by another process). A failure or
    interruption (KeyboardInterrupt included) removes it; its name holds the writer's pid, so that
    what a killed writer (SIGKILL skips cleanup) left is removed by the next one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.removeprefix(f".{path.name}.tmp-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        if path.exists() and not replace:
            shutil.rmtree(tmp)
            return
        replace_dir(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)  # the rename, durably
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


def replace_dir(new: Path, path: Path) -> None:
    """Put the directory `new` at `path`. An existing `path` is exchanged with `new` in one atomic
    step (Linux renameat2 RENAME_EXCHANGE) and then removed; where the system or filesystem cannot
    exchange, it is renamed aside first, which leaves a moment with nothing at `path`."""
    if not path.exists():
        os.replace(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new)  # now the old directory
    else:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot exchange {str(a)!r} and {str(b)!r}: {os.strerror(code)}")


SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def out_of_space(e: BaseException | None) -> bool:
    """Whether a write failed for want of space (a full disk, a quota, a file-size limit). The
    safetensors writer reports it as its own error that carries the system's message."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in SPACE_ERRORS:
            return True
        if any(os.strerror(code) in str(e) for code in SPACE_ERRORS):
            return True
        e = e.__cause__ or e.__context__
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (with its suffix) to write; renamed to `path` when the block ends."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
