"""Worker side of a webhook delivery: claim it, make one attempt, and record it. A delivery that
failed goes back to `pending` with its next attempt's time (exponential backoff: the sweeper
sends it again once that time has come), or to `failed` once its attempts are spent. Called by
workers/tasks.py on the `webhooks` queue; as with every outbox row, a message for a delivery that
is not due, held by another worker, finished or deleted does nothing."""

from sqlalchemy import select, update

from app.core import outbox
from app.core.config import get_settings
from app.core.db import session_scope
from app.db.tables import Webhook, WebhookDelivery, utcnow
from app.webhooks import sender
from app.webhooks.service import retry_at


def run_delivery(delivery_id: str) -> str:
    settings, me = get_settings(), outbox.worker_identity()
    with session_scope() as session:
        due = session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.id == delivery_id, outbox.DELIVERY.due()))
        if due is None or not outbox.claim(session, outbox.DELIVERY, delivery_id, me, settings.job_lease_seconds):
            return "not_held"
        delivery = session.get(WebhookDelivery, delivery_id)
        webhook = session.get(Webhook, delivery.webhook_id)
        url, secret, payload, attempts = webhook.url, webhook.secret, delivery.payload, delivery.attempts + 1
    attempt = sender.send(url, secret, delivery_id, payload, settings.webhook_timeout_seconds,
                          settings.webhook_allow_private_addresses)  # fmt: skip
    entry = {"at": utcnow().isoformat(), "status_code": attempt.status_code, "error": attempt.error,
             "seconds": round(attempt.seconds, 3)}  # fmt: skip
    retry = None if attempt.ok else retry_at(settings, attempts)
    if attempt.ok:
        values = {"status": "succeeded", "finished_at": utcnow()}
    elif retry is None:
        values = {"status": "failed", "finished_at": utcnow(),
                  "error": {"code": "delivery_failed", "message": f"{attempts} attempts failed; the last: {attempt.error}"}}  # fmt: skip
    else:  # back to waiting, sent again by the sweeper once it is due
        values = {"status": outbox.DELIVERY.waiting, "claimed_by": None, "dispatched_at": None, "next_attempt_at": retry}
    with session_scope() as session:
        log = session.scalar(select(WebhookDelivery.log).where(WebhookDelivery.id == delivery_id)) or []
        held = session.execute(
            update(WebhookDelivery).where(*outbox.still_held(outbox.DELIVERY, delivery_id, me))
            .values(attempts=attempts, log=[*log, entry], **values)
        ).rowcount  # fmt: skip
        session.commit()
    return values["status"] if held else "dropped"
