"""Replacing a directory so that a process killed at any moment (SIGKILL, power loss) leaves
either the old or the new directory in place, never neither and never a mix: engines
(`redrafter build`) and training checkpoints are directories of several files."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

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
