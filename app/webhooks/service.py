"""Webhooks: a tenant's endpoints, and the deliveries of its events to them.

`record` is called in the transaction that changes what the event is about (a job succeeding, a
dataset becoming ready...): the delivery rows commit with it or not at all, and are dispatched to a
worker once that transaction has committed (then by the sweeper, if that message is lost). The
request path never sends anything.
"""

import base64
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from app.core import outbox
from app.core.config import Settings
from app.core.db import session_scope
from app.core.errors import Conflict, Invalid
from app.core.tenancy import Scoped
from app.db.tables import Webhook, WebhookDelivery, utcnow
from app.webhooks.schemas import WebhookCreate
from app.webhooks.sender import Refused, check_url

webhooks = Scoped(Webhook, "webhook")
deliveries = Scoped(WebhookDelivery, "delivery")
_RECORDED = "webhook_deliveries"  # session.info key: deliveries recorded in the session's transaction


def create(session: Session, settings: Settings, tenant_id: str, request: WebhookCreate) -> Webhook:
    try:
        check_url(request.url, settings.webhook_allow_private_addresses)
    except Refused as exc:
        raise Invalid(f"Webhook URL refused: {exc}.", code="webhook_url_refused") from exc
    webhook = Webhook(
        id=f"wh_{secrets.token_hex(12)}", tenant_id=tenant_id, url=request.url, events=sorted(set(request.events)),
        description=request.description, secret="whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
    )  # fmt: skip
    session.add(webhook)
    session.commit()
    return webhook


def delete(session: Session, webhook: Webhook) -> None:
    session.delete(webhook)  # its deliveries go with it (ON DELETE CASCADE)
    session.commit()


def list_deliveries(session: Session, webhook: Webhook, limit: int) -> list[WebhookDelivery]:
    return deliveries.list(session, webhook.tenant_id, limit, WebhookDelivery.webhook_id == webhook.id)


def resend(session: Session, delivery: WebhookDelivery) -> WebhookDelivery:
    """Send a finished delivery again, with the same id (receivers deduplicate on it) and a fresh
    set of attempts."""
    if delivery.status in (outbox.DELIVERY.waiting, outbox.DELIVERY.held):
        raise Conflict(f"Delivery '{delivery.id}' is {delivery.status}: it is being sent already.",
                       code="delivery_in_progress")  # fmt: skip
    delivery.status, delivery.attempts, delivery.next_attempt_at = outbox.DELIVERY.waiting, 0, utcnow()
    delivery.claimed_by = delivery.dispatched_at = delivery.finished_at = None
    session.info.setdefault(_RECORDED, []).append(delivery.id)
    session.commit()
    session.refresh(delivery)
    return delivery


def record(session: Session, tenant_id: str, event_type: str, data: dict[str, Any]) -> None:
    """A delivery of `event_type` to each of the tenant's webhooks that asked for it, in the
    caller's transaction."""
    subscribed = [w for w in session.scalars(webhooks.select(tenant_id)) if event_type in w.events]
    now = utcnow()
    for webhook in subscribed:
        delivery_id = f"msg_{secrets.token_hex(12)}"
        payload = {"type": event_type, "timestamp": now.isoformat(), "data": data}
        session.add(WebhookDelivery(id=delivery_id, webhook_id=webhook.id, tenant_id=tenant_id, event=event_type,
                                    payload=payload, status=outbox.DELIVERY.waiting, next_attempt_at=now, log=[]))  # fmt: skip
        session.info.setdefault(_RECORDED, []).append(delivery_id)


def retry_at(settings: Settings, attempts: int):
    """When a delivery that has failed `attempts` times is tried again; None once they are spent."""
    if attempts >= settings.webhook_max_attempts:
        return None
    return utcnow() + timedelta(seconds=settings.webhook_retry_seconds * 2 ** (attempts - 1))


@event.listens_for(Session, "after_commit")
def _dispatch_recorded(session: Session) -> None:
    recorded = session.info.pop(_RECORDED, None)
    if recorded:
        with session_scope() as fresh:  # the committed session cannot run statements in this hook
            outbox.dispatch(fresh, outbox.DELIVERY, recorded)


@event.listens_for(Session, "after_rollback")
def _forget_recorded(session: Session) -> None:
    session.info.pop(_RECORDED, None)


def get_delivery(session: Session, webhook: Webhook, delivery_id: str) -> WebhookDelivery:
    return deliveries.first(session, webhook.tenant_id, delivery_id, WebhookDelivery.id == delivery_id,
                            WebhookDelivery.webhook_id == webhook.id)  # fmt: skip


def get(session: Session, tenant_id: str, webhook_id: str) -> Webhook:
    return webhooks.get(session, tenant_id, webhook_id)


def list_webhooks(session: Session, tenant_id: str, limit: int, after: str | None = None) -> list[Webhook]:
    return webhooks.list(session, tenant_id, limit, after=after)
