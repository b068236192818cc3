"""Writing outputs so that a failure never leaves a half-written result or clobbers a user's files."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory beside `dst` that becomes `dst` only if the block succeeds.

    An existing `dst` is refused rather than replaced: it may be a user's only copy.
    """
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"output {dst} already exists; choose a new path or remove it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(dst)
    tmp.mkdir()  # the umask's ordinary permissions, unlike mkdtemp's private ones
    try:
        yield tmp
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike, mode: str = "w") -> Iterator:
    """An open file that replaces `dst` atomically when the block succeeds."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(dst)
    # Created as open() creates files (0o666 less the umask), unlike mkstemp's private ones.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike) -> Iterator[Path]:
    """A fresh path beside `dst`, for a writer that opens its file itself, that becomes `dst` only if
    the block succeeds. An existing `dst` is refused rather than replaced."""
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"output {dst} already exists; choose a new path or remove it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(dst)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def partial_name(dst: Path) -> Path:
    """A fresh name beside `dst` (same filesystem, so the final rename is atomic)."""
    return dst.parent / f".{dst.name}.{secrets.token_hex(8)}.partial"
