"""Dynamic micro-batching: concurrent requests for one model share a forward pass.

Requests put their images on a queue (preprocessed pixels, or JPEGs the batch decodes itself:
`app.serving.device_decode`); one task per model takes the first waiting image, gathers more until
`max_batch_size` images or `max_wait_ms` have passed, runs them as one batch in a thread (never on
the event loop) and hands each request its own rows. An image the batch could not take (a JPEG
that would not decode) fails its own request only.

A batcher is closed when its model leaves the cache (evicted, deleted, re-exported), from any
thread. Closing never strands a request: images already queued are still run, and a request that
arrives afterwards (it found the model before the eviction) runs alone, on the model it holds.
"""

import asyncio
from collections.abc import Callable, Sequence

import torch

_CLOSE = object()  # queued by close(): everything before it is served, then the task ends


# A batch's images -> one output row per image, or the exception of an image it could not take.
RunBatch = Callable[[list], Sequence[torch.Tensor | Exception]]


class MicroBatcher:
    def __init__(self, run_batch: RunBatch, max_batch_size: int, max_wait_ms: float):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    async def submit(self, images: Sequence) -> tuple[torch.Tensor, int]:
        """Rows of the batched output for `images` (pixels (N, C, H, W), or a list), and the largest
        forward pass they were part of."""
        if self.max_batch_size <= 1 or self._closed:
            outputs = await asyncio.to_thread(self.run_batch, list(images))
            return _stacked([row if isinstance(row, Exception) else (row, len(images)) for row in outputs])
        if self._task is None:
            self._loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()
            self._task = self._loop.create_task(self._serve())
        # No await from the check of `_closed` to the last put: every image queued here is ahead
        # of close()'s marker, which can only be queued by a later callback of this loop.
        futures = []
        for image in images:
            future = self._loop.create_future()
            self._queue.put_nowait((image, future))
            futures.append(future)
        return _stacked(await asyncio.gather(*futures, return_exceptions=True))  # (every error retrieved)

    async def _serve(self) -> None:
        closing = False
        while not closing:
            first = await self._queue.get()
            if first is _CLOSE:
                return
            pending = [first]
            deadline = self._loop.time() + self.max_wait
            while len(pending) < self.max_batch_size:
                timeout = deadline - self._loop.time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    break
                if item is _CLOSE:
                    closing = True  # serve what was gathered, then stop
                    break
                pending.append(item)
            await self._run(pending)

    async def _run(self, pending: list[tuple[object, asyncio.Future]]) -> None:
        try:
            outputs = await asyncio.to_thread(self.run_batch, [image for image, _ in pending])
        except Exception as exc:  # every waiting request gets the error, the loop goes on
            outputs = [exc] * len(pending)
        for (_, future), row in zip(pending, outputs, strict=True):
            if future.done():
                continue  # a request past its deadline has stopped waiting
            if isinstance(row, Exception):
                future.set_exception(row)
            else:
                future.set_result((row, len(pending)))

    def close(self) -> None:
        """Stop batching, from any thread: what is queued is still served, later requests run alone."""
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _CLOSE)


def _stacked(results: list) -> tuple[torch.Tensor, int]:
    """A request's rows and the largest batch among them, from each image's (row, batch size); or
    the first image's error."""
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return torch.stack([row for row, _ in results]), max(size for _, size in results)
