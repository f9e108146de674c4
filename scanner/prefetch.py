"""Run a producer (reading, batching, tokenizing) ahead of the model: in a background thread, or in a forked
child process, whose Python does not take turns with the model's for one interpreter lock."""

from __future__ import annotations

import contextlib
import fcntl
import gc
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
PIPE_BYTES = 1 << 20  # Linux's default largest pipe for an unprivileged process; a block of 1,024 CLIP prompts is 0.7 MB


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


def produced_ahead(items: Iterable[T]) -> Iterator[T]:
    """Yield `items` in order while a forked child process iterates them, about one item ahead (each item is
    pickled through a pipe); re-raises its errors. Where `can_fork()` is false, a thread produces them (`prefetch`).

    The child only reads files and tokenizes: it must not touch a CUDA context or a thread pool, which do
    not survive a fork, nor free what it inherited (an ONNX Runtime session's destructor, run by the child's
    garbage collector, hung on its dead threads' condition variable). It ignores Ctrl-C (the parent ends
    it) and leaves when the parent does (its next write finds the pipe broken).
    """
    if not can_fork():
        yield from prefetch(items)
        return
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    with contextlib.suppress(OSError):  # a pipe that holds a whole block: the child starts the next one at once
        fcntl.fcntl(writer.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # Linux's (as is every fork here)
    for stream in (sys.stdout, sys.stderr):  # nothing buffered here may be written twice
        stream.flush()
    collecting = gc.isenabled()
    gc.disable()  # no collection in the child before it has set its inheritance aside (`_produce`)
    try:
        child = context.Process(target=_produce, args=(items, reader, writer), name="memscan-reader", daemon=True)
        child.start()
    finally:
        if collecting:
            gc.enable()
    writer.close()  # the child's death must end the pipe: then a half-sent item reads as end of file
    try:
        while True:
            try:
                kind, value = reader.recv()
            except (EOFError, OSError):  # OSError: the pipe ended part way through an item
                child.join()
                raise MemscanError(f"the prompt-reading process stopped unexpectedly (exit code {child.exitcode})") from None
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        reader.close()


def _produce(items: Iterable, reader, writer) -> None:
    """The child's loop: each item, then ("done", None) or ("error", exception)."""
    gc.freeze()  # what was inherited is never collected here (see `produced_ahead`); the child's own garbage is
    gc.enable()
    reader.close()  # the parent's death must break the pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent may have used the Rust tokenizers' thread pool, which a forked child cannot.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        for item in items:
            writer.send(("item", item))
        writer.send(("done", None))
    except BrokenPipeError:  # the parent is gone: nobody reads
        return
    except BaseException as exc:  # noqa: BLE001 - every error goes to the parent, which raises it
        with contextlib.suppress(BrokenPipeError):
            writer.send(("error", _picklable(exc)))


def _picklable(exc: BaseException) -> BaseException:
    """`exc` itself when it pickles and is a user's error; else a RuntimeError carrying its traceback."""
    if isinstance(exc, MemscanError):
        try:
            pickle.dumps(exc)
            return exc
        except Exception:  # noqa: BLE001 - an unpicklable argument: its message still travels
            return MemscanError(str(exc))
    return RuntimeError("in the prompt-reading process:\n" + "".join(traceback.format_exception(exc)))
