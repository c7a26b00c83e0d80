"""What the registry answers about a tenant's holdings (quotas ask here, never the table)."""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import Model


def stored_bytes(session: Session, tenant_id: str) -> int:
    # int(): PostgreSQL sums a bigint column as numeric (a Decimal here).
    return int(session.scalar(select(func.coalesce(func.sum(Model.size_bytes), 0)).where(Model.tenant_id == tenant_id)))


def model_count(session: Session, tenant_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Model).where(Model.tenant_id == tenant_id))
