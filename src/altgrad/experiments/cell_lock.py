"""A lock per cell, so that two launches on one grid never run (or delete) the same cell.

The lock is the file ``<run_dir>/cell.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local
disks, NFS v3+ and Lustre, unlike ``flock``, which Lustre may keep node-local). It holds the owner
as JSON: ``{"host": ..., "pid": ..., "started": <unix time>, "token": <random>}``, and its owner
deletes it when the cell ends (also on an exception or a signal). A lock left by a process that died
(``kill -9``, a lost node) is *stale*: on the same host it is detected by its pid (no such process)
and taken over; a lock from another host cannot be checked from here, so it is reported with its
path, and deleting that file (once that launch is gone) frees the cell. An unreadable lock file
(its owner died between creating and writing it) is stale after a minute.

Example::

    >>> lock = CellLock.acquire(Path("runs/quick/E4M3-adamw-s0"))
    >>> lock is None          # another live launch holds it
    False
    >>> lock.release()
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_NAME = "cell.lock"
UNREADABLE_STALE_S = 60.0  # a lock file is written within microseconds of its creation


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def read_owner(run_dir: Path) -> dict[str, Any] | None:
    """The owner recorded in ``run_dir``'s lock, or None when the cell is not locked."""
    try:
        return json.loads((run_dir / LOCK_NAME).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):  # being written this instant, or its owner died then
        with contextlib.suppress(FileNotFoundError):
            return {"host": "?", "pid": -1, "started": (run_dir / LOCK_NAME).stat().st_mtime, "token": ""}
        return None


def is_stale(owner: dict[str, Any]) -> bool:
    """A lock whose owner is a dead process on this host (a lock from another host is never stale
    here), or an unreadable lock older than ``UNREADABLE_STALE_S`` (its owner died while writing it)."""
    if owner.get("pid") == -1:
        return time.time() - owner.get("started", 0) > UNREADABLE_STALE_S
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    return owner["pid"] == os.getpid() or not _alive(owner["pid"])  # our own pid: a reused one


def held_by_other(run_dir: Path) -> dict[str, Any] | None:
    """The owner of a live lock on ``run_dir`` (None when unlocked or stale)."""
    owner = read_owner(run_dir)
    return owner if owner is not None and not is_stale(owner) else None


def describe_owner(run_dir: Path, owner: dict[str, Any]) -> str:
    """``"pid 123 on node7 since 09:41:02 (lock: runs/m/c/cell.lock)"``."""
    since = time.strftime("%H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')} since {since} (lock: {run_dir / LOCK_NAME})"


@dataclass
class CellLock:
    """A lock held by this process on one cell's run folder; ``release()`` deletes it."""

    path: Path
    text: str

    @classmethod
    def acquire(cls, run_dir: Path) -> CellLock | None:
        """Take the cell's lock, breaking a stale one; None when another live process holds it."""
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                 "token": secrets.token_hex(8)}  # fmt: skip
        text = json.dumps(owner)
        for _ in range(2):  # the second try follows breaking a stale lock
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    seen = path.read_text()
                except FileNotFoundError:  # released this instant: try again
                    continue
                if held_by_other(run_dir) is not None:
                    return None
                _break_stale(path, seen)
                continue
            with os.fdopen(fd, "w") as file:
                file.write(text)
            return cls(path, text)
        return None

    def release(self) -> None:
        """Delete the lock file if it is still this lock's (idempotent)."""
        with contextlib.suppress(FileNotFoundError):
            if self.path.read_text() == self.text:
                self.path.unlink()


def _break_stale(path: Path, seen: str) -> None:
    """Remove the stale lock whose text was ``seen``, without removing a fresh one taken meanwhile.

    The lock is renamed away atomically (only one launch wins the rename); a file that turns out not
    to be the stale lock (another launch broke it and locked the cell in between) is linked back."""
    trash = path.with_name(f"{path.name}.stale.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    if trash.read_text() != seen:
        with contextlib.suppress(FileExistsError):
            os.link(trash, path)
    trash.unlink()
