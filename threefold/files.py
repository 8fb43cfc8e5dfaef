"""File-system rules every writer and reader in threefold follows.

* A name read from a file (a checkpoint manifest, a Hugging Face index) is resolved with `inside`: it
  must stay inside the directory that holds the file, after following symlinks. A damaged or hostile
  manifest can then not make threefold open, hash or load anything elsewhere.
* Writes that commit something (a checkpoint, a dataset, `latest`) are durable before they are visible:
  the files and their directory are fsynced, then one rename publishes them (`sync_tree`, `write_atomic`,
  `publish_dir`). Without the fsyncs a power loss right after a save can leave a committed step of empty
  files.
* Output commands never delete what they were not asked to (`check_output_dir`), and one run directory
  has one writer at a time (`RunLock`).

This module is a leaf: it imports nothing from threefold, so every layer may use it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def inside(root: str | Path, name: str, *, what: str = "file") -> Path:
    """`root / name`, refused with a ValueError unless it stays inside `root` once symlinks are followed.

    `name` comes from a file threefold reads (a manifest, an index), so it is untrusted: absolute paths,
    `..` components and symlinks that leave `root` are all rejected.
    """
    root = Path(root)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{what} name {name!r} in {str(root)!r} is not a valid file name")
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ValueError(f"{what} name {name!r} in {str(root)!r} leaves its directory; refusing to read it")
    path = root / candidate
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise ValueError(
            f"{what} {str(path)!r} resolves to {str(real)!r}, outside {str(real_root)!r} "
            "(a symlink leaving the directory); refusing to read it"
        )
    return path


def fsync_file(path: str | Path) -> None:
    """Flush a file's contents to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (the names created, renamed or removed in it) to stable storage."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; their renames are durable anyway
    finally:
        os.close(fd)


def sync_tree(path: str | Path) -> None:
    """fsync every regular file directly in `path`, then `path` itself: call before the rename that
    publishes the directory."""
    path = Path(path)
    for child in path.iterdir():
        if child.is_file() and not child.is_symlink():
            fsync_file(child)
    fsync_dir(path)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` so that a reader sees the old or the new content, never a mix, and the
    new content survives a crash once this returns."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def check_output_dir(
    out: str | Path, *, overwrite: bool, keep: tuple[str | Path, ...] | list[str | Path] = ()
) -> None:
    """Refuse to write an output directory that holds anything, unless `overwrite`; even then refuse
    when it holds (or is) one of the `keep` paths, e.g. the checkpoint being exported.

    Raises ValueError naming the directory and what it holds.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a directory")
    real_out = out.resolve()
    for kept in keep:
        real = Path(kept).resolve()
        if real == real_out or real_out in real.parents:
            raise ValueError(
                f"output directory {str(out)!r} holds the input {str(kept)!r}; writing there would "
                "replace it. Choose another output directory"
            )
    if out.is_dir() and not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise ValueError(
                f"output directory {str(out)!r} is not empty ({shown}); pass --overwrite to replace "
                "its contents, or choose an empty directory"
            )


def publish_dir(tmp: str | Path, out: str | Path) -> None:
    """Make the complete directory `tmp` visible as `out`: its files are fsynced first, then one rename
    publishes it. Whatever `out` held moves aside and is deleted only once the new contents are in place
    (call `check_output_dir` first: this replaces without asking)."""
    tmp, out = Path(tmp), Path(out)
    sync_tree(tmp)
    old = None
    if out.exists():
        old = tmp.with_name(f"{tmp.name}-old")
        shutil.rmtree(old, ignore_errors=True)  # the remains of a crash mid-publish
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """A fresh temporary sibling of `out` to write an output directory into; published as `out` with
    `publish_dir` when the block succeeds, removed (leaving `out` untouched) when it raises."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir rather than mkdtemp: mkdtemp's 0700 mode would survive the rename into `out`.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class RunLock:
    """An exclusive lock on a run directory: a second run writing the same directory fails at once,
    naming the first (its pid, host and start time).

    The lock is an flock on `<dir>/.lock`, so it is released when the holder exits, even by SIGKILL: a
    crashed run never leaves a stale lock behind. (flock is advisory and per open file; every writer of a
    run directory takes it through this class.)
    """

    def __init__(self, directory: str | Path, *, what: str = "run directory") -> None:
        self.directory = Path(directory)
        self.what = what
        self._file: IO[str] | None = None

    def acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / ".lock"
        f = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RuntimeError(
                f"{self.what} {str(self.directory)!r} is in use by another run ({holder}); "
                "wait for it to finish or choose another directory"
            ) from None
        f.seek(0)
        f.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        f.write(json.dumps(info) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
