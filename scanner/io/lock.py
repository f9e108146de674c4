"""One writer at a time: an exclusive `flock` on a file, waited for up to a bound."""

from __future__ import annotations

import fcntl
import os
import time
import weakref
from pathlib import Path
from typing import BinaryIO

from ..errors import MemscanError

# The locks this process holds. An flock lives as long as any copy of its descriptor does, so a forked child
# (a scan's reading process) must let go of its copies: else a parent killed mid-scan stays locked until the
# child notices, and a resume waits.
_HELD: weakref.WeakSet = weakref.WeakSet()


def _release_in_child() -> None:
    """In a forked child: point each held lock's descriptor at /dev/null (its file object stays valid)."""
    for lock in list(_HELD):
        if not lock.closed:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, lock.fileno())
            os.close(null)


os.register_at_fork(after_in_child=_release_in_child)


def lock_file(path: Path, wait_s: float, busy: str) -> BinaryIO:
    """Open `path` (created if missing) and hold an exclusive lock on it, waiting up to `wait_s`.

    Closing the returned file releases the lock; `busy` is the one-line error when the wait runs
    out; an `OSError` opening the file is the caller's to word.
    """
    deadline = time.monotonic() + wait_s
    while True:
        lock = open(path, "ab")  # noqa: SIM115 - held open by the caller: closing it releases the lock
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    lock.close()
                    raise MemscanError(busy) from None
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        # A holder that removes the file on release (`unlock_and_remove`) may have done so while
        # we waited: the lock then sits on a file no one else can find, so take the new one.
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                _HELD.add(lock)
                return lock
        except FileNotFoundError:
            pass
        lock.close()


def unlock_and_remove(lock: BinaryIO) -> None:
    """Remove the lock file (while still holding it, so no waiter is left on it), then release it."""
    try:
        os.unlink(lock.name)
    except FileNotFoundError:
        pass
    finally:
        lock.close()
