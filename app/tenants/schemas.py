from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.ids import BIGINT_MAX

# read: GET; train: uploads, jobs, exports, aliases, deletes; predict: predict, embed;
# admin: all of these within the tenant, and its keys; operator: tenants, quotas, anyone's keys.
Scope = Literal["read", "train", "predict", "admin", "operator"]


class Quotas(BaseModel):
    """Per-tenant limits; null = the server's default (VISIONTUNE_DEFAULT_MAX_*)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_stored_bytes: int | None = Field(None, ge=0, le=BIGINT_MAX)
    max_concurrent_jobs: int | None = Field(None, ge=0, le=BIGINT_MAX)
    max_models: int | None = Field(None, ge=0, le=BIGINT_MAX)


class TenantCreate(Quotas):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")


class Usage(BaseModel):
    stored_bytes: int
    concurrent_jobs: int
    models: int


class TenantOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    quotas: Quotas  # as set on the tenant
    limits: Quotas  # in force: the tenant's own or the server's default
    usage: Usage
    created_at: datetime


class TenantList(BaseModel):
    data: list[TenantOut]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field("", max_length=100)
    scopes: list[Scope] = Field(min_length=1, max_length=5)


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    tenant_id: str
    name: str
    prefix: str = Field(description="The start of the key, to recognise it; the key itself is never shown again.")
    scopes: list[Scope]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="The API key. Shown only in this response: store it now.")


class KeyList(BaseModel):
    data: list[KeyOut]


class Me(BaseModel):
    tenant: TenantOut
    key: KeyOut
