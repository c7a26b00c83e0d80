"""/v1/admin: tenants, their keys and quotas (admin scope); /v1/me: the calling key and its tenant."""

from typing import Annotated

from fastapi import APIRouter, Query, status
from sqlalchemy.orm import Session

from app.core.auth import AdminKey, AnyKey
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


@router.get("/v1/me", response_model=Me)
def me(principal: AnyKey, session: SessionDep) -> Me:
    """The calling key, its tenant, the tenant's quotas and usage."""
    key = session.get(ApiKey, principal.key_id)
    return Me(tenant=_out(session, service.get_tenant(session, principal.tenant_id)), key=KeyOut.model_validate(key))


@router.post("/v1/admin/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantOut)
def create_tenant(request: TenantCreate, _: AdminKey, session: SessionDep) -> TenantOut:
    return _out(session, service.create_tenant(session, request.name, **request.model_dump(exclude={"name"})))


@router.get("/v1/admin/tenants", response_model=TenantList)
def list_tenants(_: AdminKey, session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> TenantList:
    return TenantList(data=[_out(session, tenant) for tenant in service.list_tenants(session, limit)])


@router.get("/v1/admin/tenants/{tenant_id}", response_model=TenantOut)
def get_tenant(tenant_id: TenantId, _: AdminKey, session: SessionDep) -> TenantOut:
    return _out(session, service.get_tenant(session, tenant_id))


@router.patch("/v1/admin/tenants/{tenant_id}", response_model=TenantOut)
def set_quotas(tenant_id: TenantId, request: Quotas, _: AdminKey, session: SessionDep) -> TenantOut:
    """Set the quotas sent (null: back to the server default); those not sent stay as they are."""
    tenant = service.get_tenant(session, tenant_id)
    for name, value in request.model_dump(exclude_unset=True).items():
        setattr(tenant, name, value)
    session.commit()
    return _out(session, tenant)


@router.post("/v1/admin/tenants/{tenant_id}/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def create_key(tenant_id: TenantId, request: KeyCreate, _: AdminKey, session: SessionDep) -> KeyCreated:
    row, key = service.create_key(session, service.get_tenant(session, tenant_id), request.name, request.scopes)
    return KeyCreated(**KeyOut.model_validate(row).model_dump(), key=key)


@router.get("/v1/admin/tenants/{tenant_id}/keys", response_model=KeyList)
def list_keys(tenant_id: TenantId, _: AdminKey, session: SessionDep) -> KeyList:
    return KeyList(data=service.list_keys(session, service.get_tenant(session, tenant_id)))


@router.delete("/v1/admin/keys/{key_id}", response_model=KeyOut)
def revoke_key(key_id: KeyId, principal: AdminKey, session: SessionDep) -> ApiKey:
    """Revoke a key: it stops working at once. The row stays, for the audit trail. A key cannot
    revoke itself (409), so an admin cannot lock themselves out by mistake."""
    return service.revoke_key(session, key_id, revoked_by=principal)
