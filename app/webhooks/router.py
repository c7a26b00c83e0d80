"""/v1/webhooks: a tenant's webhook endpoints, and their deliveries (sent by a worker)."""

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from app.core.auth import AdminKey, AnyKey, ReadKey
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.ids import DeliveryId, WebhookId
from app.core.pagination import PageDep
from app.db.tables import Webhook
from app.webhooks import service
from app.webhooks.schemas import DeliveryList, DeliveryOut, WebhookCreate, WebhookCreated, WebhookList, WebhookOut

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def _webhook(webhook_id: WebhookId, principal: AnyKey, session: SessionDep) -> Webhook:
    return service.get(session, principal.tenant_id, webhook_id)


WebhookDep = Annotated[Webhook, Depends(_webhook)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=WebhookCreated)
def create_webhook(request: WebhookCreate, principal: AdminKey, session: SessionDep) -> Webhook:
    """Deliveries are POSTs of `{"type", "timestamp", "data"}`, signed per the Standard Webhooks
    spec with the `secret` of this response (the only time it is shown). A URL on a private,
    loopback or link-local address is refused (422) unless the server allows them."""
    return service.create(session, get_settings(), principal.tenant_id, request)


@router.get("", response_model=WebhookList)
def list_webhooks(principal: ReadKey, session: SessionDep, page: PageDep) -> dict:
    return {"data": service.list_webhooks(session, principal.tenant_id, page.limit, page.after)}


@router.get("/{webhook_id}", response_model=WebhookOut)
def get_webhook(webhook: WebhookDep, _: ReadKey) -> Webhook:
    return webhook


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_webhook(webhook: WebhookDep, _: AdminKey, session: SessionDep) -> Response:
    service.delete(session, webhook)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList)
def list_deliveries(
    webhook: WebhookDep, _: ReadKey, session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict:
    """Newest first, each with its attempts: when, the receiver's status code, the error."""
    return {"data": service.list_deliveries(session, webhook, limit)}


@router.post("/{webhook_id}/deliveries/{delivery_id}/resend", response_model=DeliveryOut)
def resend_delivery(webhook: WebhookDep, delivery_id: DeliveryId, _: AdminKey, session: SessionDep) -> DeliveryOut:
    """Send a finished delivery again (same `webhook-id`, fresh attempts); 409 while it is pending."""
    return service.resend(session, service.get_delivery(session, webhook, delivery_id))
