"""What the jobs domain answers to others: a tenant's active jobs (quotas), a dataset's (deletes)."""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import Job

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


def active_jobs(session: Session, tenant_id: str) -> int:
    query = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
    return session.scalar(query)


def active_job_on_dataset(session: Session, dataset_id: str) -> str | None:
    """The id of a queued or running job that reads this dataset, if any."""
    return session.scalar(select(Job.id).where(Job.dataset_id == dataset_id, Job.status.in_(ACTIVE)).limit(1))
