"""Server-Sent Events: a line-by-line parser, and `follow`, which reads a stream to its `end` event,
reconnecting after a dropped connection with `Last-Event-ID`."""

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import httpx

from visiontune_client._http import Deadline, Transport, backoff
from visiontune_client.errors import APIConnectionError


@dataclass(frozen=True)
class ServerSentEvent:
    event: str  # its `event:` field; "message" when it has none
    data: str  # its `data:` lines, joined by newlines
    id: str | None  # its own `id:` field, if it has one


class SSEDecoder:
    """Feed it the stream's lines (without their line breaks); it returns each event once complete.
    `last_event_id` is the id of the last complete event that had one: what a reconnection sends as
    `Last-Event-ID`."""

    def __init__(self, last_event_id: str | None = None):
        self.last_event_id = last_event_id
        self.discard_partial()

    def discard_partial(self) -> None:
        """Forget a half-received event (its connection dropped)."""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:  # a blank line ends an event (one without data is none, but its id counts)
            event = ServerSentEvent(self._event or "message", "\n".join(self._data), self._id) if self._data else None
            if self._id is not None:
                self.last_event_id = self._id
            self.discard_partial()
            return event
        if line.startswith(":"):  # a comment: the server's keep-alive
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


async def follow(
    transport: Transport, path: str, deadline: Deadline, what: str, last_event_id: str | None = None
) -> AsyncGenerator[ServerSentEvent, None]:
    """GET `path` as an event stream and yield its events up to and including `end`. A connection
    that drops, or ends before `end`, is opened again from the last event id, after a pause;
    `max_retries` such breaks in a row with no event between them raise `APIConnectionError`.
    `deadline` (for `what`) raises `WaitTimeoutError`."""
    decoder = SSEDecoder(last_event_id)
    breaks = 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if decoder.last_event_id is not None:
            headers["Last-Event-ID"] = decoder.last_event_id
        response = await transport.request("GET", path, headers=headers, stream=True, read_timeout=deadline.remaining())
        try:
            async for line in transport.lines(response):
                deadline.check(what)
                event = decoder.feed(line)
                if event is not None:
                    breaks = 0
                    yield event
                    if event.event == "end":
                        return
        except httpx.TransportError:  # dropped, or silent past the read timeout
            pass
        finally:
            await transport.release(response)
        deadline.check(what)
        decoder.discard_partial()
        if breaks >= transport.config.max_retries:
            url = str(response.request.url)
            raise APIConnectionError(f"the event stream {url} broke off {breaks + 1} times in a row", url)
        await transport.sleep(backoff(breaks))
        breaks += 1
