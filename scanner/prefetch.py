"""Run a producer (reading, batching, tokenizing) ahead of the model: in a background thread, or in a forked
child process, whose Python does not take turns with the model's for one interpreter lock."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator
from typing import TypeVar

from .errors import MemscanError

T = TypeVar("T")
_DONE = object()
# How often a waiting side checks that the other one is still there (seconds).
_POLL_S = 0.5


def prefetch(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Yield `items` in order while a thread produces up to `depth` ahead; re-raises its errors."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            buffer.put(exc)

    thread = threading.Thread(target=produce, name="memscan-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def can_fork() -> bool:
    """Whether `produced_ahead` forks here: on Linux, outside a daemonic process (which may have no children)."""
    return sys.platform == "linux" and not multiprocessing.current_process().daemon


def produced_ahead(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Yield `items` in order while a forked child process iterates them, up to `depth` ahead (items are
    pickled across); re-raises its errors. Where `can_fork()` is false, a thread produces them (`prefetch`).

    The child only reads files and tokenizes: it must not touch a CUDA context or torch's thread pool,
    which do not survive a fork. It ignores Ctrl-C (the parent ends it) and exits when the parent does.
    """
    if not can_fork():
        yield from prefetch(items, depth)
        return
    context = multiprocessing.get_context("fork")
    channel = context.Queue(maxsize=depth)
    for stream in (sys.stdout, sys.stderr):  # nothing buffered here may be written twice
        stream.flush()
    child = context.Process(target=_produce, args=(items, channel, os.getpid()), name="memscan-reader", daemon=True)
    child.start()
    try:
        while True:
            try:
                kind, value = channel.get(timeout=_POLL_S)
            except queue.Empty:
                if not child.is_alive():
                    raise MemscanError(f"the prompt-reading process stopped unexpectedly (exit code {child.exitcode})")
                continue
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        channel.close()
        channel.cancel_join_thread()


def _produce(items: Iterable, channel, parent: int) -> None:
    """The child's loop: each item, then ("done", None) or ("error", exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent may have used the Rust tokenizers' thread pool, which a forked child cannot.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def send(message: tuple) -> bool:
        while True:
            try:
                channel.put(message, timeout=_POLL_S)
                return True
            except queue.Full:
                if os.getppid() != parent:  # the parent is gone: nobody reads
                    return False

    try:
        for item in items:
            if not send(("item", item)):
                return
        send(("done", None))
    except BaseException as exc:  # noqa: BLE001 - every error goes to the parent, which raises it
        send(("error", _picklable(exc)))
    channel.close()
    channel.join_thread()


def _picklable(exc: BaseException) -> BaseException:
    """`exc` itself when it pickles and is a user's error; else a RuntimeError carrying its traceback."""
    if isinstance(exc, MemscanError):
        try:
            pickle.dumps(exc)
            return exc
        except Exception:  # noqa: BLE001 - an unpicklable argument: its message still travels
            return MemscanError(str(exc))
    return RuntimeError("in the prompt-reading process:\n" + "".join(traceback.format_exception(exc)))
