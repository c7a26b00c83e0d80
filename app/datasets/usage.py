"""What the datasets domain answers about a tenant's holdings (quotas ask here, never the table)."""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import Dataset


def stored_bytes(session: Session, tenant_id: str) -> int:
    # int(): PostgreSQL sums a bigint column as numeric (a Decimal here).
    return int(session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant_id)))
