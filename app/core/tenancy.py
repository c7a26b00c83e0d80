"""Tenant-scoped reads in one place. Every domain gets and lists its objects through a `Scoped`
table, whose every statement starts from `WHERE tenant_id = :tenant`: another tenant's rows are
never reachable, and a foreign id answers exactly as a missing one (404)."""

from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from app.core.errors import Invalid, NotFound

T = TypeVar("T")


class Scoped(Generic[T]):
    """A table whose rows belong to tenants (it has `tenant_id`, and `id` for `get`)."""

    def __init__(self, table: type[T], noun: str):
        self.table, self.noun = table, noun

    def select(self, tenant_id: str) -> Select[tuple[T]]:
        """The base statement of every read: add conditions to it, never remove this one."""
        return select(self.table).where(self.table.tenant_id == tenant_id)

    def not_found(self, ref: str) -> NotFound:
        return NotFound(f"{self.noun.capitalize()} '{ref}' not found.", code=f"{self.noun}_not_found")

    def get(self, session: Session, tenant_id: str, object_id: str) -> T:
        return self.first(session, tenant_id, object_id, self.table.id == object_id)

    def first(self, session: Session, tenant_id: str, ref: str, *where: Any) -> T:
        """The tenant's row matching `where`, or NotFound naming `ref`."""
        found = session.scalar(self.select(tenant_id).where(*where))
        if found is None:
            raise self.not_found(ref)
        return found

    def list(self, session: Session, tenant_id: str, limit: int, *where: Any, after: str | None = None) -> list[T]:
        """The tenant's rows matching `where`, newest first; with `after` (a row's id), the rows after
        it in that order. Keyset pagination: rows added since the first page shift nothing."""
        created_at, row_id = self.table.created_at, self.table.id
        query = self.select(tenant_id).where(*where)
        if after is not None:
            cursor = session.scalar(self.select(tenant_id).where(row_id == after))
            if cursor is None:
                raise Invalid(f"after='{after}' is not one of your {self.noun}s.", code="invalid_cursor")
            query = query.where(or_(created_at < cursor.created_at, and_(created_at == cursor.created_at, row_id < after)))
        return list(session.scalars(query.order_by(created_at.desc(), row_id.desc()).limit(limit)))
