"""Dynamic micro-batching: concurrent requests for one model share a forward pass.

Requests put preprocessed images on a queue; one task per model takes the first waiting image,
gathers more until `max_batch_size` images or `max_wait_ms` have passed, runs them as one batch
in a thread (never on the event loop) and hands each request its own rows.
"""

import asyncio
from collections.abc import Callable

import torch


class MicroBatcher:
    def __init__(self, run_batch: Callable[[torch.Tensor], torch.Tensor], max_batch_size: int, max_wait_ms: float):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Rows of the batched output for `images` (N, C, H, W), and the largest forward pass they
        were part of."""
        if self.max_batch_size <= 1:
            return await asyncio.to_thread(self.run_batch, images), len(images)
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._serve())
        futures = []
        for image in images:
            future = asyncio.get_running_loop().create_future()
            self._queue.put_nowait((image, future))
            futures.append(future)
        results = await asyncio.gather(*futures)
        return torch.stack([row for row, _ in results]), max(size for _, size in results)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(pending) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    pending.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            try:
                outputs = await asyncio.to_thread(self.run_batch, torch.stack([image for image, _ in pending]))
            except Exception as exc:  # every waiting request gets the error, the loop goes on
                for _, future in pending:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), row in zip(pending, outputs, strict=True):
                if not future.done():
                    future.set_result((row, len(pending)))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
