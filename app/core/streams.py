"""Server-Sent Events: how an endpoint that can stream decides to, and the response it streams.

The stream polls the database (a job's events and progress are rows that a worker on any host
writes), so it needs no broker channel and works with any number of API processes.
"""

from collections.abc import AsyncIterator

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.core.config import get_settings

POLL_SECONDS = 0.5

# Documented on endpoints that stream: the media type beside their JSON answer.
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                         "description": "With `stream=true` or `Accept: text/event-stream`: Server-Sent Events."}}  # fmt: skip


def wanted(request: Request, stream: bool) -> bool:
    return stream or "text/event-stream" in request.headers.get("accept", "")


def response(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """Keep-alive comments every `sse_keepalive_seconds` keep proxies from closing a quiet stream;
    `X-Accel-Buffering: no` keeps nginx from holding the events back."""
    return EventSourceResponse(events, ping=get_settings().sse_keepalive_seconds, headers={"X-Accel-Buffering": "no"})
