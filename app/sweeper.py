"""The sweeper: the broker catches up with the rows (app/core/outbox.py), and files that no row
owns are removed.

Every `sweep_interval_seconds` one sweeper at a time (a lease row in the database, so it works on
SQLite and PostgreSQL alike, and a dead sweeper's lease runs out) sends again the messages of
training jobs, dataset ingests and model exports that are:
- waiting and never dispatched, or dispatched longer than `redispatch_seconds` ago;
- held by a worker that is gone: heartbeat older than `job_lease_seconds`, or a holder process on
  this host that no longer exists.
A duplicate message is harmless: a worker claims a row by a conditional update, so a second
message for work that is held, finished or cancelled does nothing.
"""

import logging
import os
import sys
import time
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core import broker, logs, outbox
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.leases import take_lease
from app.core.storage import remove_quietly, stale_entries
from app.datasets import service as datasets
from app.db.tables import Job, JobEvent, Lease, utcnow
from app.jobs.usage import WAITING
from app.models import service as models

logger = logging.getLogger(__name__)
SWEEPER_LEASE = "sweeper"
CONSUMER = "consumer:"  # leases "consumer:<queue>:<sweeper>": which queues live workers consume


def sweep(settings: Settings, holder: str, queues: list[str] = ()) -> list[str]:
    """One pass; the ids it dispatched again (none when another sweeper holds the lease).
    `queues`: those its worker consumes, announced for as long as the worker lives."""
    sent = []
    with session_scope() as session:
        for queue in queues:
            take_lease(session, f"{CONSUMER}{queue}:{holder}", holder, settings.sweep_interval_seconds * 3)
        if not take_lease(session, SWEEPER_LEASE, holder, settings.sweep_interval_seconds * 3):
            return []
        note_missing_workers(session)
        for work in outbox.KINDS:
            lost = outbox.lost(session, work, settings.redispatch_seconds, settings.job_lease_seconds)
            sent += outbox.dispatch(session, work, lost)
    if sent:
        logger.info("sweeper dispatched %d message(s) again: %s", len(sent), ", ".join(sent))
    with session_scope() as session:
        removed = collect_orphans(session, settings, settings.orphan_max_age_seconds)
    if removed:
        logger.info("sweeper removed %d file(s) no row owns: %s", len(removed), ", ".join(removed))
    return sent


def note_missing_workers(session: Session) -> list[str]:
    """A job that asks for a GPU (or a CPU) worker while none is running stays queued, and its
    events say why, once. The ids of the jobs noted now."""
    now = utcnow()
    session.execute(delete(Lease).where(Lease.name.like(f"{CONSUMER}%"), Lease.expires_at < now - timedelta(hours=1)))
    noted = []
    for accelerator in ("gpu", "cpu"):
        queue = broker.training_queue(accelerator)
        live = session.scalar(select(Lease.name).where(Lease.name.like(f"{CONSUMER}{queue}:%"), Lease.expires_at > now).limit(1))
        if live:
            continue
        message = f"waiting for a {accelerator} worker: none is running"
        waiting = session.scalars(select(Job.id).where(Job.status == "queued", Job.accelerator == accelerator)).all()
        told = set(session.scalars(select(JobEvent.job_id).where(JobEvent.job_id.in_(waiting), JobEvent.message == message)))
        for job_id in waiting:
            if job_id not in told:
                session.add(JobEvent(job_id=job_id, type="status", message=message, data={"accelerator": accelerator}))
                noted.append(job_id)
    session.commit()
    return noted


def collect_orphans(session: Session, settings: Settings, older_than: float) -> list[str]:
    """Files that no row owns, left by a process stopped at the wrong moment: datasets, uploads and
    models (their domains decide), checkpoints of jobs that are over, and staging leftovers."""
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


def run_sweeper(queues: list[str]) -> None:
    """`sweep` every `sweep_interval_seconds` until the process that started this one is gone.
    Each worker runs this in a process of its own (workers/celery_app.py); the lease lets one act
    at a time."""
    settings, parent, holder = get_settings(), os.getppid(), outbox.worker_identity()
    while os.getppid() == parent:
        time.sleep(settings.sweep_interval_seconds)
        try:
            sweep(settings, holder, queues)
        except Exception:  # a database or broker hiccup must not end the sweeper
            logger.exception("sweep failed; trying again next interval")


if __name__ == "__main__":  # started by each worker (workers/celery_app.py)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/sweeper] %(message)s")
    logs.configure(get_settings().log_format)
    run_sweeper([queue for queue in sys.argv[1].split(",") if queue] if len(sys.argv) > 1 else [])
