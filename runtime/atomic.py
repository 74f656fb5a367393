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
    what a killed writer left can be told from a live one's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        if replace or not path.exists():
            replace_dir(tmp, path)
        else:
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, path: Path) -> None:
    """Rename the finished directory `tmp` to `path`; a directory at `path` is swapped out first and
    removed after, so `path` always holds one whole version; the rename is made durable (fsync)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
