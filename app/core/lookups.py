"""Database lookups that every prediction makes (who the API key is, which model a reference
names), answered from memory for a moment: without it they were about a third of an API process's
CPU per prediction (bench/SPEED.md), and a database round trip each on PostgreSQL."""

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cachetools import TTLCache
from fastapi.concurrency import run_in_threadpool

T = TypeVar("T")
MAX_ENTRIES = 10_000


class CachedLookup(Generic[T]):
    """`lookup(*args)`'s answers (never its errors: a refused key is asked again), kept `ttl`
    seconds in this process. The writes that change an answer clear this process's entries at once
    (`clear`); other API processes see them within `ttl` seconds. With `ttl` 0, every call asks.
    `lookup` is blocking (a database session): a miss runs it in the thread pool, a hit never
    leaves the event loop."""

    def __init__(self, lookup: Callable[..., T], ttl: float, timer: Callable[[], float] = time.monotonic):
        self.lookup = lookup
        self._cache: TTLCache | None = TTLCache(MAX_ENTRIES, ttl, timer=timer) if ttl > 0 else None
        self._lock = threading.Lock()  # TTLCache is not thread-safe; clear() comes from worker threads
        self._clears = 0

    async def __call__(self, *args: Hashable) -> T:
        if self._cache is None:
            return await run_in_threadpool(self.lookup, *args)
        with self._lock:
            found, clears = self._cache.get(args, _MISSING), self._clears
        if found is not _MISSING:
            return found
        answer = await run_in_threadpool(self.lookup, *args)
        with self._lock:
            if self._clears == clears:  # not read before a change that cleared the cache meanwhile
                self._cache[args] = answer
        return answer

    def clear(self) -> None:
        if self._cache is not None:
            with self._lock:
                self._cache.clear()
                self._clears += 1


_MISSING = object()
