"""One writer at a time: an exclusive `flock` on a file, waited for up to a bound."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import BinaryIO

from ..errors import MemscanError


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
