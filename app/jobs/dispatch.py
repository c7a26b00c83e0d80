"""The outbox: the jobs table says what must run; the sweeper makes the broker catch up.

Messages can be lost (enqueueing failed after the commit, a broker restarted without its data, a
worker died between taking a message and claiming its job, or died holding the job on a broker
that never redelivers); rows cannot. Every `sweep_interval_seconds` one sweeper at a time (a lease
row in the database, so it works on SQLite and PostgreSQL alike, and a dead sweeper's lease runs
out) enqueues again:
- queued jobs never dispatched, or dispatched longer than `redispatch_seconds` ago;
- running jobs whose worker is gone: heartbeat older than `job_lease_seconds`, or a holder process
  on this host that no longer exists.
A duplicate message is harmless: the claim in `app.jobs.runner` is a conditional update, so a
second message for a job that is already running, finished or cancelled does nothing.
"""

import logging
import os
import socket
import time
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core import broker
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.leases import take_lease
from app.core.storage import remove_quietly, stale_entries
from app.datasets import service as datasets
from app.db.tables import Job, JobEvent, utcnow
from app.jobs.usage import WAITING
from app.models import service as models

logger = logging.getLogger(__name__)
SWEEPER_LEASE = "jobs.sweeper"


def dispatch(session: Session, job_ids: list[str]) -> list[str]:
    """Enqueue these jobs and record when; the ids whose message could not be sent stay for the
    sweeper (the broker may be down: the rows are the truth)."""
    sent = []
    for job_id in job_ids:
        try:
            broker.enqueue_finetune(job_id)
        except Exception as exc:  # any broker failure: the sweeper tries again
            logger.warning("job %s not dispatched (the sweeper will retry): %s", job_id, exc)
            continue
        sent.append(job_id)
    if sent:
        session.execute(update(Job).where(Job.id.in_(sent)).values(dispatched_at=utcnow()))
        session.commit()
    return sent


def holder_gone(holder: str | None, heartbeat_at, lease_seconds: int) -> bool:
    """A job's holder ("host:pid") has stopped: its heartbeat is older than the lease, or it was a
    process on this host that no longer exists."""
    host, _, pid = (holder or "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return heartbeat_at is None or utcnow() - heartbeat_at > timedelta(seconds=lease_seconds)


def sweep(settings: Settings, holder: str) -> list[str]:
    """One pass; the ids of the jobs it dispatched again (none when another sweeper holds the lease)."""
    with session_scope() as session:
        if not take_lease(session, SWEEPER_LEASE, holder, settings.sweep_interval_seconds * 3):
            return []
        now = utcnow()
        stale_dispatch = now - timedelta(seconds=settings.redispatch_seconds)
        queued = session.scalars(
            select(Job.id).where(
                Job.status == "queued", or_(Job.dispatched_at.is_(None), Job.dispatched_at < stale_dispatch)
            )
        ).all()
        running = session.execute(
            select(Job.id, Job.claimed_by, Job.heartbeat_at, Job.dispatched_at).where(Job.status == "running")
        ).all()
        # A takeover is dispatched once per lease, not on every sweep while the message waits.
        recent = now - timedelta(seconds=settings.job_lease_seconds)
        orphaned = [
            row.id for row in running
            if holder_gone(row.claimed_by, row.heartbeat_at, settings.job_lease_seconds)
            and (row.dispatched_at is None or row.dispatched_at < recent)
        ]  # fmt: skip
        sent = dispatch(session, [*queued, *orphaned])
    if sent:
        logger.info("sweeper dispatched %d job(s) again: %s", len(sent), ", ".join(sent))
    with session_scope() as session:
        removed = collect_orphans(session, settings, settings.orphan_max_age_seconds)
    if removed:
        logger.info("sweeper removed %d file(s) no row owns: %s", len(removed), ", ".join(removed))
    return sent


def collect_orphans(session: Session, settings: Settings, older_than: float) -> list[str]:
    """Files that no row owns, left by a process stopped at the wrong moment: datasets and models
    (their domains decide), checkpoints of jobs that are over, and staging leftovers."""
    removed = [*datasets.collect_orphans(session, settings, older_than),
               *models.collect_orphans(session, settings, older_than)]  # fmt: skip
    stale = stale_entries(settings.jobs_dir, older_than)
    unfinished = set(session.scalars(
        select(Job.id).where(Job.id.in_([p.name for p in stale]), Job.status.in_(WAITING))
    ))  # fmt: skip
    for path in [*(p for p in stale if p.name not in unfinished), *stale_entries(settings.staging_dir, older_than)]:
        remove_quietly(path)
        removed.append(path.name)
    return removed


def release(holders: list[str]) -> list[str]:
    """Put the running jobs of these worker processes back in the queue and send them at once, for
    a warm shutdown: each process stops at its next heartbeat (it no longer holds its job), and
    another worker resumes the job from its last checkpoint without waiting for a lease to run out."""
    if not holders:
        return []
    with session_scope() as session:
        ids = session.scalars(select(Job.id).where(Job.status == "running", Job.claimed_by.in_(holders))).all()
        if not ids:
            return []
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status == "running", Job.claimed_by.in_(holders))
            .values(status="queued", claimed_by=None, dispatched_at=None)
        )
        for job_id in ids:
            session.add(JobEvent(job_id=job_id, type="status", message="released by a worker shutting down: queued again",
                                 data={"workers": holders}))  # fmt: skip
        session.commit()
        return dispatch(session, list(ids))


def run_sweeper() -> None:
    """`sweep` every `sweep_interval_seconds` until the process that started this one is gone.
    Each worker runs this in a process of its own (workers/celery_app.py); the lease lets one act
    at a time."""
    settings, parent, holder = get_settings(), os.getppid(), f"{socket.gethostname()}:{os.getpid()}"
    while os.getppid() == parent:
        time.sleep(settings.sweep_interval_seconds)
        try:
            sweep(settings, holder)
        except Exception:  # a database or broker hiccup must not end the sweeper
            logger.exception("sweep failed; trying again next interval")


if __name__ == "__main__":  # started by each worker (workers/celery_app.py)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/sweeper] %(message)s")
    run_sweeper()
