"""Outputs appear complete or not at all: every file a job writes goes to a temporary file in the
same directory, is flushed to disk and renamed over the target, so a crash leaves the old file or
the new one, never a truncated one that looks like a result; a directory (:func:`atomic_dir`) is
written whole under a temporary name, then renamed to its own. And an output directory that cannot
be written to is found before a job starts (:func:`check_writable`)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _default_mode(path: str | Path, full: int) -> None:
    """Give ``path`` the permissions a plain create would (``full`` less the umask), not mkstemp's /
    mkdtemp's owner-only ones."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, full & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, fsync it and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _default_mode(tmp, 0o666)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success, fsync its files and rename it to
    ``path``, which must not exist (a directory is never replaced: it could be the user's own)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _default_mode(tmp, 0o777)
        if path.exists():
            raise FileExistsError(f"{path} exists: it is not replaced")
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


class OutputNotWritable(OSError):
    """An output directory a job cannot write to (read-only, full, not a directory)."""


def check_writable(path: str | Path) -> Path:
    """Create directory ``path`` if needed and write, fsync and remove a probe file in it, so that a
    read-only or full disk stops a job before it starts rather than at its first checkpoint or its
    export. Raises :class:`OutputNotWritable` naming the directory."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        try:
            os.write(fd, bytes(4096))  # a full disk may still create an empty file, but refuses its data
            os.fsync(fd)  # where the file system allocates blocks late, ENOSPC only shows here
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputNotWritable(f"cannot write to output directory {path}: {e.strerror or e}") from e
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
