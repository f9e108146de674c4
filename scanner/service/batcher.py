"""Micro-batching: concurrent score requests merged into one scoring call.

Requests that arrive within `window_s` of the first one, or while the worker is still busy
with the previous batch, are scored together in one call on the single worker thread
(the model is used from that one thread only). At most `max_queued` prompts wait: past that,
`submit` raises `QueueFull` at once (the service answers 503); a request whose client went
away (its future cancelled) is dropped from its batch unscored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

Result = TypeVar("Result")


class QueueFull(Exception):
    """The batcher already holds `max_queued` prompts waiting for the worker."""


class MicroBatcher(Generic[Result]):
    """`await batcher.submit(items)` -> that request's rows of one merged `run(all_items)` call."""

    def __init__(
        self, run: Callable[[list[str]], list[Result]], executor: Executor, window_s: float = 0.005, max_queued: int = 4096
    ):
        self.run = run
        self.executor = executor
        self.window_s = window_s
        self.max_queued = max_queued
        self.calls = 0  # merged calls made, for monitoring and tests
        self.queued = 0  # prompts waiting, not yet handed to the worker
        self._pending: list[tuple[list[str], asyncio.Future]] = []
        self._flush: asyncio.Task | None = None
        self._busy = asyncio.Lock()

    async def submit(self, items: list[str]) -> list[Result]:
        """Queue `items`; resolves with their results, in order, once their batch has run."""
        if self.queued + len(items) > self.max_queued:
            raise QueueFull(f"{self.queued} prompts already wait for the model (at most {self.max_queued})")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((items, future))
        self.queued += len(items)
        if self._flush is None:
            self._flush = loop.create_task(self._flush_after_window())
        return await future

    async def _flush_after_window(self) -> None:
        await asyncio.sleep(self.window_s)
        async with self._busy:
            # Taken only once the worker is free: everything that queued meanwhile joins.
            batch, self._pending, self._flush = self._pending, [], None
            self.queued -= sum(len(request) for request, _ in batch)
            batch = [(request, future) for request, future in batch if not future.cancelled()]
            if not batch:  # every client of this batch went away
                return
            items = [item for request, _ in batch for item in request]
            self.calls += 1
            try:
                results = await asyncio.get_running_loop().run_in_executor(self.executor, self.run, items)
            except Exception as exc:  # every waiting request gets the failure, none hangs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
        offset = 0
        for request, future in batch:
            if not future.done():  # a client that went away has a cancelled future
                future.set_result(results[offset : offset + len(request)])
            offset += len(request)
