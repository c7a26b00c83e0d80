"""What the jobs domain answers to others: a tenant's active jobs (quotas), a dataset's (deletes)."""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import Job

ACTIVE = ("queued", "running")  # counted against max_concurrent_jobs
WAITING = (*ACTIVE, "paused")  # not finished: still needs its dataset, may still be cancelled
TERMINAL = ("succeeded", "failed", "cancelled")


def jobs_by_status(session: Session) -> dict[str, int]:
    """Every tenant's jobs, counted by status (for the metrics)."""
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


def active_jobs(session: Session, tenant_id: str) -> int:
    query = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
    return session.scalar(query)


def active_job_on_dataset(session: Session, dataset_id: str) -> str | None:
    """The id of an unfinished job (queued, running or paused) that reads this dataset, if any."""
    return session.scalar(select(Job.id).where(Job.dataset_id == dataset_id, Job.status.in_(WAITING)).limit(1))
