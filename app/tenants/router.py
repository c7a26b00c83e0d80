"""/v1/admin: the platform operator's tenants, quotas and keys (operator scope); /v1/keys: a
tenant admin's own keys (admin scope); /v1/me: the calling key and its tenant."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from sqlalchemy.orm import Session

from app.core.auth import AdminKey, AnyKey, OperatorKey, Principal
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.ids import KeyId, TenantId
from app.db.tables import ApiKey, Tenant
from app.tenants import service
from app.tenants.schemas import KeyCreate, KeyCreated, KeyList, KeyOut, Me, Quotas, TenantCreate, TenantList, TenantOut

router = APIRouter(tags=["tenants"])


def _out(session: Session, tenant: Tenant) -> TenantOut:
    return TenantOut(
        id=tenant.id,
        name=tenant.name,
        quotas=Quotas.model_validate(tenant, from_attributes=True),
        limits=Quotas(**service.limits(get_settings(), tenant)),
        usage=service.usage(session, tenant.id),
        created_at=tenant.created_at,
    )


def _created(session: Session, tenant: Tenant, request: KeyCreate, principal: Principal) -> KeyCreated:
    row, key = service.create_key(session, tenant, request.name, request.scopes, granted_by=principal)
    return KeyCreated(**KeyOut.model_validate(row).model_dump(), key=key)


@router.get("/v1/me", response_model=Me)
def me(principal: AnyKey, session: SessionDep) -> Me:
    """The calling key, its tenant, the tenant's quotas (read-only here) and usage."""
    key = service.get_key(session, principal.key_id)
    return Me(tenant=_out(session, service.get_tenant(session, principal.tenant_id)), key=KeyOut.model_validate(key))


# A tenant admin's own keys -----------------------------------------------------------------------


@router.post("/v1/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def create_own_key(request: KeyCreate, principal: AdminKey, session: SessionDep) -> KeyCreated:
    """A new key for the caller's own tenant (never with the operator scope unless the caller has it)."""
    return _created(session, service.get_tenant(session, principal.tenant_id), request, principal)


@router.get("/v1/keys", response_model=KeyList)
def list_own_keys(principal: AdminKey, session: SessionDep) -> KeyList:
    return KeyList(data=service.list_keys(session, service.get_tenant(session, principal.tenant_id)))


@router.delete("/v1/keys/{key_id}", response_model=KeyOut)
def revoke_own_key(key_id: KeyId, principal: AdminKey, session: SessionDep, request: Request) -> ApiKey:
    """Revoke one of the tenant's keys (another tenant's key ids answer 404), as below."""
    revoked = service.revoke_key(session, key_id, revoked_by=principal, tenant_id=principal.tenant_id)
    request.app.state.key_lookup.clear()
    return revoked


# The platform operator -----------------------------------------------------------------------------


@router.post("/v1/admin/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantOut)
def create_tenant(request: TenantCreate, _: OperatorKey, session: SessionDep) -> TenantOut:
    return _out(session, service.create_tenant(session, request.name, **request.model_dump(exclude={"name"})))


@router.get("/v1/admin/tenants", response_model=TenantList)
def list_tenants(_: OperatorKey, session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> TenantList:
    return TenantList(data=[_out(session, tenant) for tenant in service.list_tenants(session, limit)])


@router.get("/v1/admin/tenants/{tenant_id}", response_model=TenantOut)
def get_tenant(tenant_id: TenantId, _: OperatorKey, session: SessionDep) -> TenantOut:
    return _out(session, service.get_tenant(session, tenant_id))


@router.patch("/v1/admin/tenants/{tenant_id}", response_model=TenantOut)
def set_quotas(tenant_id: TenantId, request: Quotas, _: OperatorKey, session: SessionDep) -> TenantOut:
    """Set the quotas sent (null: back to the server default); those not sent stay as they are."""
    return _out(session, service.set_quotas(session, tenant_id, request.model_dump(exclude_unset=True)))


@router.post("/v1/admin/tenants/{tenant_id}/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def create_key(tenant_id: TenantId, request: KeyCreate, principal: OperatorKey, session: SessionDep) -> KeyCreated:
    return _created(session, service.get_tenant(session, tenant_id), request, principal)


@router.get("/v1/admin/tenants/{tenant_id}/keys", response_model=KeyList)
def list_keys(tenant_id: TenantId, _: OperatorKey, session: SessionDep) -> KeyList:
    return KeyList(data=service.list_keys(session, service.get_tenant(session, tenant_id)))


@router.delete("/v1/admin/keys/{key_id}", response_model=KeyOut)
def revoke_key(key_id: KeyId, principal: OperatorKey, session: SessionDep, request: Request) -> ApiKey:
    """Revoke any key: it stops working at once in the API process that answers this, and within
    `lookup_cache_seconds` in the others. The row stays, for the audit trail. A key cannot revoke
    itself (409), so an operator cannot lock themselves out by mistake."""
    revoked = service.revoke_key(session, key_id, revoked_by=principal)
    request.app.state.key_lookup.clear()
    return revoked
