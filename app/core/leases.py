"""Named leases in the database: one holder at a time, until it expires (so a crashed holder's
lease simply runs out). Works the same on SQLite and PostgreSQL: a conditional UPDATE, or an
INSERT that the primary key lets only one process win."""

from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.tables import Lease, utcnow


def take_lease(session: Session, name: str, holder: str, seconds: float) -> bool:
    """Hold the named lease for `seconds` (renewing it if already ours); False if another holds it."""
    now = utcnow()
    until = now + timedelta(seconds=seconds)
    taken = session.execute(
        update(Lease)
        .where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at < now))
        .values(holder=holder, expires_at=until)
    ).rowcount
    if not taken:
        if session.get(Lease, name) is not None:
            session.rollback()
            return False
        try:
            session.add(Lease(name=name, holder=holder, expires_at=until))
            session.flush()
        except IntegrityError:  # another sweeper inserted it first
            session.rollback()
            return False
    session.commit()
    return True

