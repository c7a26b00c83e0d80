"""/v1/webhooks: endpoints the server notifies of events (signed deliveries), and their deliveries."""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Sequence

from visiontune_client.resources._base import Resource, ignore, params, q
from visiontune_client.types import Delivery, Webhook


class Webhooks(Resource):
    def create(self, url: str, events: Sequence[str], description: str | None = None) -> Webhook:
        """Register `url` for `events` (e.g. job.succeeded); keep the answer's `secret`, which signs
        the deliveries: it is shown this once."""
        body = params(url=url, events=list(events), description=description)
        return self._call(Webhook.from_json, "POST", "/v1/webhooks", json=body)

    def list(self, limit: int = 100, after: str | None = None) -> list[Webhook]:
        """The newest `limit` webhooks (at most 1000), or those after the webhook `after`."""
        return self._list(Webhook.from_json, "/v1/webhooks", limit=limit, after=after)

    def iter(self, page_size: int = 100) -> Iterator[Webhook]:
        """Every webhook, newest first, `page_size` a request."""
        return self._iter(Webhook.from_json, "/v1/webhooks", page_size)

    def get(self, webhook_id: str) -> Webhook:
        return self._call(Webhook.from_json, "GET", f"/v1/webhooks/{q(webhook_id)}")

    def delete(self, webhook_id: str) -> None:
        return self._call(ignore, "DELETE", f"/v1/webhooks/{q(webhook_id)}")

    def deliveries(self, webhook_id: str, limit: int = 100) -> builtins.list[Delivery]:
        """The webhook's deliveries, newest first, each with its attempts."""
        return self._list(Delivery.from_json, f"/v1/webhooks/{q(webhook_id)}/deliveries", limit=limit)

    def resend(self, webhook_id: str, delivery_id: str) -> Delivery:
        """Send a finished delivery again (same id, fresh attempts)."""
        return self._call(
            Delivery.from_json, "POST", f"/v1/webhooks/{q(webhook_id)}/deliveries/{q(delivery_id)}/resend"
        )
