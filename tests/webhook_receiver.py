"""A real HTTP server on 127.0.0.1 that receives webhook deliveries in a thread of the test process,
records each request, and answers with the statuses a test gives it."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook


class Receiver:
    def __init__(self, statuses: list[int] | None = None, default: int = 204):
        self.requests: list[dict] = []
        self.statuses, self.default = list(statuses or []), default
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
                status = receiver.statuses.pop(0) if receiver.statuses else receiver.default
                self.send_response(status)
                if status in (301, 302, 307, 308):
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/visiontune"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def verified(self, secret: str) -> list[dict]:
        """Every request's payload, each checked against its signature (raises if one is not signed
        with `secret`, or its headers are missing or stale) as a receiver using the Standard
        Webhooks library does."""
        return [Webhook(secret).verify(r["body"], r["headers"]) for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
