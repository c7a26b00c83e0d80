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
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import outbox
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.leases import take_lease
from app.core.storage import remove_quietly, stale_entries
from app.datasets import service as datasets
from app.db.tables import Job
from app.jobs.usage import WAITING
from app.models import service as models

logger = logging.getLogger(__name__)
SWEEPER_LEASE = "sweeper"


def sweep(settings: Settings, holder: str) -> list[str]:
    """One pass; the ids it dispatched again (none when another sweeper holds the lease)."""
    sent = []
    with session_scope() as session:
        if not take_lease(session, SWEEPER_LEASE, holder, settings.sweep_interval_seconds * 3):
            return []
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


def run_sweeper() -> None:
    """`sweep` every `sweep_interval_seconds` until the process that started this one is gone.
    Each worker runs this in a process of its own (workers/celery_app.py); the lease lets one act
    at a time."""
    settings, parent, holder = get_settings(), os.getppid(), outbox.worker_identity()
    while os.getppid() == parent:
        time.sleep(settings.sweep_interval_seconds)
        try:
            sweep(settings, holder)
        except Exception:  # a database or broker hiccup must not end the sweeper
            logger.exception("sweep failed; trying again next interval")


if __name__ == "__main__":  # started by each worker (workers/celery_app.py)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/sweeper] %(message)s")
    run_sweeper()
