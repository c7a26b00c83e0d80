"""Server-Sent Events: how an endpoint that can stream decides to, and the response it streams.

The stream polls the database (a job's events and progress are rows that a worker on any host
writes), so it needs no broker channel and works with any number of API processes.
"""

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.core.config import get_settings

POLL_SECONDS = 0.5

# Documented on endpoints that stream: the media type beside their JSON answer, and each event's
# fields (`itemSchema`, as OpenAPI 3.2 describes the items of a stream).
STREAM_RESPONSE = {200: {
    "description": "With `stream=true` or `Accept: text/event-stream`: Server-Sent Events.",
    "content": {"text/event-stream": {"itemSchema": {
        "type": "object",
        "properties": {"event": {"type": "string"}, "data": {"type": "string", "description": "JSON"},
                       "id": {"type": "string"}, "retry": {"type": "integer"}},
        "required": ["data"],
    }}},
}}  # fmt: skip


def wanted(request: Request, stream: bool) -> bool:
    return stream or "text/event-stream" in request.headers.get("accept", "")


def response(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """Keep-alive comments every `sse_keepalive_seconds` keep proxies from closing a quiet stream;
    `X-Accel-Buffering: no` keeps nginx from holding the events back."""
    return EventSourceResponse(events, ping=get_settings().sse_keepalive_seconds, headers={"X-Accel-Buffering": "no"})


async def polls() -> AsyncIterator[int]:
    """The beat of a stream: one tick at once, then one every POLL_SECONDS, for at most
    `sse_max_seconds`. Then the stream closes without an `end` event, and the client reconnects
    (as EventSource does) to resume with Last-Event-ID: no connection is held forever by a job that
    waits for a worker that never comes."""
    deadline = time.monotonic() + get_settings().sse_max_seconds
    tick = 0
    while time.monotonic() < deadline:
        yield tick
        tick += 1
        await asyncio.sleep(POLL_SECONDS)
