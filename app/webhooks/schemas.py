from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

WebhookEvent = Literal["job.succeeded", "job.failed", "job.cancelled", "dataset.ready", "dataset.failed", "model.exported"]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000, description="http(s) URL that receives the deliveries (POST).")
    events: list[WebhookEvent] = Field(min_length=1, description="The events to deliver.")
    description: str | None = Field(None, max_length=500)


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    url: str
    events: list[WebhookEvent]
    description: str | None
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="Signs every delivery (Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature` "
        "headers); shown in this response only."
    )


class WebhookList(BaseModel):
    data: list[WebhookOut]


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="The `webhook-id` header of its requests: the same on every attempt and resend.")
    webhook_id: str
    event: WebhookEvent
    status: Literal["pending", "sending", "succeeded", "failed"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="When a pending delivery is tried next.")
    log: list[dict[str, Any]] = Field(description="Each attempt: when, the receiver's status code (null: no answer), error.")
    payload: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None


class DeliveryList(BaseModel):
    data: list[DeliveryOut]
