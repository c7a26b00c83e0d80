"""Slow request bodies: neither uvicorn nor Starlette bounds how long a client may take to send a
body, so a client dripping bytes could hold a connection and a worker thread for ever. This ASGI
middleware answers 408 when a body goes `idle_timeout` seconds without a byte, or is not complete
after `total_timeout` seconds. (Body *sizes* are FastAPI's own `max_body_size`.)"""

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import RequestTimeout


class BodyTimeoutMiddleware:
    def __init__(self, app: ASGIApp, idle_timeout: float, total_timeout: float):
        self.app, self.idle_timeout, self.total_timeout = app, idle_timeout, total_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_timeout
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # after the body, receive() only waits for a disconnect: no limit
                return await receive()
            timeout = min(self.idle_timeout, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(timeout, 0))
            except TimeoutError:
                raise RequestTimeout(
                    f"The request body was not received in time (nothing for {self.idle_timeout:g} s, "
                    f"or not complete after {self.total_timeout:g} s).",
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)
