"""Tenants, their API keys and their quotas.

A key is `vt_<prefix>_<secret>`: 32 random bytes of secret, shown once. Only the SHA-256 of the
whole key is stored. A fast hash is the right one here (as for GitHub or Stripe tokens): the
secret is random, not a password, so there is nothing for a slow hash to protect against; the
prefix finds the row and the hash is compared in constant time.
"""

import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.auth import Principal
from app.core.config import Settings
from app.core.db import new_session
from app.core.errors import Conflict, Forbidden, NotFound, QuotaExceeded, Unauthorized
from app.datasets import usage as datasets_usage
from app.db.tables import ApiKey, Tenant, utcnow
from app.jobs import usage as jobs_usage
from app.models import usage as models_usage

LAST_USED_RESOLUTION = timedelta(minutes=1)  # at most one write per key per minute, not one per request


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(session: Session, name: str, **quotas: int | None) -> Tenant:
    if session.scalar(select(Tenant.id).where(Tenant.name == name)):
        raise Conflict(f"Tenant '{name}' already exists.", code="tenant_exists")
    tenant = Tenant(id=f"tn_{secrets.token_hex(12)}", name=name, **quotas)
    session.add(tenant)
    session.commit()
    return tenant


def get_tenant(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"Tenant '{tenant_id}' not found.", code="tenant_not_found")
    return tenant


def list_tenants(session: Session, limit: int) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.created_at).limit(limit)))


def create_key(
    session: Session, tenant: Tenant, name: str, scopes: list[str], granted_by: Principal | None = None
) -> tuple[ApiKey, str]:
    """The stored key and the key itself, which is never available again. `granted_by`: the key
    asking (None: the server's own command line); nobody grants a scope they lack, so a tenant
    admin cannot make an operator."""
    if granted_by is not None and (missing := [s for s in scopes if not granted_by.allows(s)]):
        raise Forbidden(f"This API key cannot grant scopes it lacks: {', '.join(sorted(set(missing)))}.",
                        code="scope_not_grantable")  # fmt: skip
    prefix = secrets.token_hex(4)
    key = f"vt_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        id=f"key_{secrets.token_hex(12)}",
        tenant_id=tenant.id,
        name=name,
        prefix=f"vt_{prefix}",
        key_hash=_hash(key),
        scopes=sorted(set(scopes)),
    )
    session.add(row)
    session.commit()
    return row, key


def set_quotas(session: Session, tenant_id: str, quotas: dict[str, int | None]) -> Tenant:
    tenant = get_tenant(session, tenant_id)
    for name, value in quotas.items():
        setattr(tenant, name, value)
    session.commit()
    return tenant


def get_key(session: Session, key_id: str, tenant_id: str | None = None) -> ApiKey:
    """A key by id; with `tenant_id`, only one of that tenant's (another's answers 404)."""
    row = session.get(ApiKey, key_id)
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound(f"API key '{key_id}' not found.", code="key_not_found")
    return row


def list_keys(session: Session, tenant: Tenant) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)))


def revoke_key(session: Session, key_id: str, revoked_by: Principal, tenant_id: str | None = None) -> ApiKey:
    """Revoke a key; with `tenant_id`, only one of that tenant's (another's answers 404)."""
    row = get_key(session, key_id, tenant_id)
    if row.id == revoked_by.key_id:
        raise Conflict("A key cannot revoke itself; revoke it with another admin key.", code="revoking_own_key")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def any_active_key(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None


def authenticate(session: Session, key: str) -> Principal:
    invalid = Unauthorized("Invalid or revoked API key.", code="invalid_api_key")
    parts = key.split("_", 2)  # the secret itself may contain "_"
    if len(parts) != 3 or parts[0] != "vt" or len(key) > 100:
        raise invalid
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == f"vt_{parts[1]}"))
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, _hash(key)):
        raise invalid
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.commit()
    return Principal(tenant_id=row.tenant_id, key_id=row.id, scopes=frozenset(row.scopes))


def lookup_key(key: str) -> Principal:
    """`app.core.auth.KeyLookup`: a session of its own, closed at once, so that a request does
    not hold a database connection for its whole life (16 waiting predictions would drain the pool)."""
    with new_session() as session:
        return authenticate(session, key)


# Quotas -----------------------------------------------------------------------------------------


def limits(settings: Settings, tenant: Tenant) -> dict[str, int | None]:
    return {
        "max_stored_bytes": tenant.max_stored_bytes if tenant.max_stored_bytes is not None else settings.default_max_stored_bytes,
        "max_concurrent_jobs": tenant.max_concurrent_jobs if tenant.max_concurrent_jobs is not None else settings.default_max_concurrent_jobs,
        "max_models": tenant.max_models if tenant.max_models is not None else settings.default_max_models,
    }  # fmt: skip


def usage(session: Session, tenant_id: str) -> dict[str, int]:
    """What the tenant holds, as each domain counts it."""
    return {
        "stored_bytes": datasets_usage.stored_bytes(session, tenant_id) + models_usage.stored_bytes(session, tenant_id),
        "concurrent_jobs": jobs_usage.active_jobs(session, tenant_id),
        "models": models_usage.model_count(session, tenant_id),
    }


def check_quota(
    session: Session, settings: Settings, tenant_id: str, *, new_bytes: int = 0, new_jobs: int = 0
) -> None:
    """Refuse (429, naming the quota) what would take the tenant past a quota. Call it inside the
    transaction that creates the objects: it locks the tenant first, so two concurrent requests
    cannot both take the last unit."""
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(usage_checked_at=utcnow()))
    limit = limits(settings, get_tenant(session, tenant_id))
    used = usage(session, tenant_id)
    checks = []  # (quota, what the tenant would have, the most it may have)
    if new_bytes:
        checks.append(("max_stored_bytes", used["stored_bytes"] + new_bytes, limit["max_stored_bytes"]))
    if new_jobs:
        # A job's model needs room, and it counts as a model from the moment the job is queued.
        checks += [
            ("max_stored_bytes", used["stored_bytes"] + 1, limit["max_stored_bytes"]),
            ("max_concurrent_jobs", used["concurrent_jobs"] + new_jobs, limit["max_concurrent_jobs"]),
            ("max_models", used["models"] + used["concurrent_jobs"] + new_jobs, limit["max_models"]),
        ]
    for quota, total, most in checks:
        if most is not None and total > most:
            session.rollback()
            raise QuotaExceeded(
                f"Quota '{quota}' exceeded: this request needs {total}, the tenant's limit is {most}.",
                details=[{"quota": quota, "limit": most, "requested": total, "usage": used}],
            )
