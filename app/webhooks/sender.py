"""The one module of the service that sends HTTP requests: webhook deliveries, to the URLs tenants
registered. Nothing else in app/ or workers/ may import an HTTP client (tests/security).

Server-side request forgery is refused here: only http(s), no redirects followed, a short timeout,
no proxy from the environment, and hosts that resolve to a private, loopback, link-local or other
non-global address are refused (checked after DNS resolution, at registration and before every
attempt) unless the operator allows them (VISIONTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES).
"""

import ipaddress
import json
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook as Signer

USER_AGENT = "VisionTune-Webhooks/1"


class Refused(ValueError):
    """A URL the service will not send to; the message says why."""


def check_url(url: str, allow_private: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Refused(f"only http and https URLs are allowed, not '{parts.scheme or url}'")
    if not parts.hostname:
        raise Refused("the URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise Refused(f"the host '{parts.hostname}' cannot be resolved: {exc}") from exc
    if allow_private:
        return
    for *_, address in found:
        ip = ipaddress.ip_address(address[0].split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise Refused(f"'{parts.hostname}' resolves to {ip}, a private, loopback, link-local or reserved address")


@dataclass
class Attempt:
    status_code: int | None  # None: no answer (refused, unreachable, timed out)
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def send(url: str, secret: str, message_id: str, payload: dict, timeout: float, allow_private: bool) -> Attempt:
    started = time.perf_counter()
    body = json.dumps(payload, separators=(",", ":"))
    try:
        check_url(url, allow_private)
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Signer(secret).sign(message_id, now, body),
        }
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            response = client.post(url, content=body, headers=headers)
    except Refused as exc:
        return Attempt(None, f"refused: {exc}", time.perf_counter() - started)
    except httpx.HTTPError as exc:
        return Attempt(None, f"{type(exc).__name__}: {exc}", time.perf_counter() - started)
    error = None if 200 <= response.status_code < 300 else f"answered {response.status_code}"
    return Attempt(response.status_code, error, time.perf_counter() - started)
