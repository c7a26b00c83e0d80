"""Logs as operators collect them: with `LOG_FORMAT=json`, one JSON object per line, carrying the
request id (an `X-Request-ID` the client sent, or one made here, echoed in the response) and the
id of the job, dataset or export a worker is on.

The formatter is a few lines over the standard library's `logging` (no JSON-logging dependency
for one `json.dumps`); the ids travel in context variables, so every logger of the process,
uvicorn's and Celery's included, carries them without being passed anything.
"""

import json
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
work_id: ContextVar[str | None] = ContextVar("work_id", default=None)  # job, dataset or export being worked on


class ContextIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.work_id = work_id.get()
        return True


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}  # fmt: skip
        for key in ("request_id", "work_id"):
            if getattr(record, key, None):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(log_format: str) -> None:
    """Every handler of the process (ours, uvicorn's, Celery's) gets the ids, and the JSON format
    when asked for. Called once a process has set up its logging."""
    handlers = {h for name in (None, "uvicorn", "uvicorn.access", "uvicorn.error", "celery")
                for h in logging.getLogger(name).handlers}  # fmt: skip
    for handler in handlers:
        handler.addFilter(ContextIds())
        if log_format == "json":
            handler.setFormatter(JsonLines())


@contextmanager
def working_on(row_id: str) -> Iterator[None]:
    token = work_id.set(row_id)
    try:
        yield
    finally:
        work_id.reset(token)


class RequestIds:
    """ASGI middleware: each request gets an id (the client's `X-Request-ID` when it sent a
    sensible one), set for its logs and echoed in the response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = sent if 0 < len(sent) <= 100 and sent.isprintable() else secrets.token_hex(8)
        # Not reset afterwards: each request runs in a task of its own, and the server's last-resort
        # error handler (outside every middleware) logs in that task after this returns.
        request_id.set(rid)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)
