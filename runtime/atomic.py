"""Atomic writes: a file or directory is written under a temporary name beside its place and renamed
there when complete, so a reader (or a run killed half-way) never sees a partial one."""
from __future__ import annotations

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
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():  # swapped out first, removed after: `path` always holds one whole version
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        fd = os.open(path.parent, os.O_RDONLY)  # the rename, durably
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
