"""/v1/jobs: create, control, and follow training jobs."""

from __future__ import annotations

import builtins
import sys
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import aclosing
from typing import Any, TextIO

from visiontune_client._http import Deadline
from visiontune_client.errors import JobCancelledError, JobFailedError
from visiontune_client.resources._base import Resource, check_failed, params, q
from visiontune_client.streams import follow
from visiontune_client.types import Event, Job, Progress


class Jobs(Resource):
    def _job(self, raw: Mapping[str, Any]) -> Job:
        return Job.from_json(raw, self)

    def create(
        self,
        dataset_id: str,
        backbone: str = "mobilenetv2_100",
        strategy: str | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        auto: Mapping[str, Any] | None = None,
        model_name: str | None = None,
        accelerator: str | None = None,
        seed: int | None = None,
        pretrained: bool | None = None,
    ) -> Job:
        """Queue a training job; the options left None are the server's defaults."""
        body = params(
            dataset_id=dataset_id, backbone=backbone, strategy=strategy, hyperparameters=hyperparameters, auto=auto,
            model_name=model_name, accelerator=accelerator, seed=seed, pretrained=pretrained,
        )  # fmt: skip
        return self._call(self._job, "POST", "/v1/jobs", json=body)

    def get(self, job_id: str) -> Job:
        return self._call(self._job, "GET", f"/v1/jobs/{q(job_id)}")

    def list(self, limit: int = 100, after: str | None = None) -> list[Job]:
        """The newest `limit` jobs (at most 1000), or those after the job `after`."""
        return self._list(self._job, "/v1/jobs", limit=limit, after=after)

    def iter(self, page_size: int = 100) -> Iterator[Job]:
        """Every job, newest first, `page_size` a request."""
        return self._iter(self._job, "/v1/jobs", page_size)

    def cancel(self, job_id: str) -> Job:
        return self._call(self._job, "POST", f"/v1/jobs/{q(job_id)}/cancel")

    def pause(self, job_id: str) -> Job:
        """Stop at the next safe point, keeping the checkpoint (409 unless queued or running)."""
        return self._call(self._job, "POST", f"/v1/jobs/{q(job_id)}/pause")

    def resume(self, job_id: str) -> Job:
        """Queue a paused job again, to continue from its checkpoint."""
        return self._call(self._job, "POST", f"/v1/jobs/{q(job_id)}/resume")

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> builtins.list[Event]:
        """The job's stored events with an id above `after`, oldest first."""
        return self._list(Event.from_json, f"/v1/jobs/{q(job_id)}/events", after=after, limit=limit)

    def iter_events(self, job_id: str, after: int = 0, page_size: int = 1000) -> Iterator[Event]:
        """All the job's stored events above `after`, requested `page_size` at a time."""
        return self._t.iterate(self._pages(job_id, after, page_size))

    async def _pages(self, job_id: str, after: int, page_size: int) -> AsyncGenerator[Event, None]:
        while True:
            query = {"after": after, "limit": page_size}
            page = (await self._t.json("GET", f"/v1/jobs/{q(job_id)}/events", params=query))["data"]
            for raw in page:
                yield Event.from_json(raw)
            if len(page) < page_size:
                return
            after = page[-1]["id"]

    def stream(self, job_id: str, last_event_id: int | None = None) -> Iterator[Event]:
        """The job's events as they happen (after `last_event_id`, if given), `progress` events among
        them, through the last `end` event; a dropped connection is resumed where it broke off."""
        return self._t.iterate(self._stream(job_id, last_event_id))

    async def _stream(self, job_id: str, last_event_id: int | None) -> AsyncGenerator[Event, None]:
        start = None if last_event_id is None else str(last_event_id)
        path = f"/v1/jobs/{q(job_id)}/events"
        async with aclosing(follow(self._t, path, Deadline.after(None), f"job {job_id}", start)) as events:
            async for sse in events:
                yield Event.from_sse(sse)

    def wait(self, job_id: str, progress: bool = False, timeout: float | None = None) -> Job:
        """Follow the job until it ends and return it: `JobFailedError` if it failed,
        `JobCancelledError` if cancelled, `WaitTimeoutError` after `timeout` seconds.
        `progress`: a live status line on stderr."""
        return self._t.run(self._wait(job_id, progress, timeout))

    async def _wait(self, job_id: str, progress: bool, timeout: float | None) -> Job:
        path, what = f"/v1/jobs/{q(job_id)}", f"job {job_id}"
        line = ProgressLine(sys.stderr) if progress else None
        try:
            async with aclosing(follow(self._t, f"{path}/events", Deadline.after(timeout), what)) as events:
                async for sse in events:
                    if line:
                        line.update(Event.from_sse(sse))
        finally:
            if line:
                line.finish()
        job = await self._fetch(self._job, "GET", path)
        if job.status == "cancelled":
            message = job.error.message if job.error else "cancelled before it finished"
            raise JobCancelledError(what, "cancelled", message, job)
        return check_failed(job, JobFailedError, what)


class ProgressLine:
    """A job's live status: phase, epoch, the latest validation accuracy, images per second, time
    left. On a terminal, one line rewritten in place with a carriage return; elsewhere (a log
    file, a pipe), a new line each time the status changes."""

    def __init__(self, out: TextIO):
        self._out = out
        self._tty = out.isatty()
        self._progress: Progress | None = None
        self._accuracy: float | None = None
        self._shown = ""

    def update(self, event: Event) -> None:
        if event.type == "progress":
            self._progress = Progress.from_json(event.data)
        elif event.type == "epoch" and event.data.get("val_accuracy") is not None:
            self._accuracy = event.data["val_accuracy"]
        else:
            return
        text = self.render()
        if text == self._shown:
            return
        self._out.write("\r" + text.ljust(len(self._shown)) if self._tty else text + "\n")
        self._out.flush()
        self._shown = text

    def render(self) -> str:
        p = self._progress
        parts = [p.phase if p else "waiting"]
        if p and p.queue_position:
            parts.append(f"queue position {p.queue_position}")
        if p and p.epochs:
            parts.append(f"epoch {p.epoch}/{p.epochs}")
        if self._accuracy is not None:
            parts.append(f"val_accuracy {self._accuracy:.3f}")
        if p and p.images_per_second:
            parts.append(f"{p.images_per_second:.0f} img/s")
        if p and p.eta_seconds is not None:
            minutes, seconds = divmod(round(p.eta_seconds), 60)
            parts.append(f"ETA {minutes}m{seconds:02d}s")
        return " | ".join(parts)

    def finish(self) -> None:
        if self._tty and self._shown:
            self._out.write("\n")
            self._out.flush()
