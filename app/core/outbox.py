"""The outbox: rows say what work must be done; messages only say "do row X".

Background work is rows: training jobs, dataset ingests, model exports, audits and webhook deliveries. Each
row is waiting (no holder) or held by one worker process ("host:pid", with a heartbeat), and
moves on only by conditional UPDATEs, so a duplicate message, a redelivery or a second worker
can never do the work twice: whoever does not hold the row drops the message.

Messages can be lost (enqueueing failed after the commit, a broker restarted without its data, a
worker died between taking a message and claiming the row, or died holding the row on a broker
that never redelivers); rows cannot. The sweeper (app/sweeper.py) finds what is waiting with no
recent message, or held by a worker that is gone, and calls `dispatch` again.
"""

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core import broker
from app.core.db import session_scope
from app.db.tables import Audit, Dataset, Export, Job, JobEvent, WebhookDelivery, utcnow

logger = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 2.0


@dataclass(frozen=True)
class Work:
    """One kind of background work: its table, the task that does it, and the statuses its rows
    have while they wait for a worker and while one holds them."""

    table: Any
    task: str
    waiting: str
    held: str
    queue_of: Callable[[Any], str] | None = None  # a row's queue, when rows of a kind go to different ones
    due: Callable[[], Any] | None = None  # which waiting rows may be sent now (the others wait for a retry time)

    def unfinished(self):
        return self.table.status.in_({self.waiting, self.held})


TRAINING = Work(Job, broker.FINETUNE_TASK, waiting="queued", held="running",
                queue_of=lambda job: broker.training_queue(job.accelerator))  # fmt: skip
INGEST = Work(Dataset, broker.INGEST_TASK, waiting="processing", held="processing")
EXPORT = Work(Export, broker.EXPORT_TASK, waiting="processing", held="processing")
AUDIT = Work(Audit, broker.AUDIT_TASK, waiting="processing", held="processing")
DELIVERY = Work(WebhookDelivery, broker.WEBHOOK_TASK, waiting="pending", held="sending",
                due=lambda: WebhookDelivery.next_attempt_at <= utcnow())  # fmt: skip
KINDS = (TRAINING, INGEST, EXPORT, AUDIT, DELIVERY)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def dispatch(session: Session, work: Work, ids: list[str]) -> list[str]:
    """Send a message for each row and record when; the ids whose message could not be sent stay
    for the sweeper (the broker may be down: the rows are the truth)."""
    sent = []
    queues = {}
    if work.queue_of is not None:  # only then are the rows read
        queues = {row.id: work.queue_of(row) for row in session.scalars(select(work.table).where(work.table.id.in_(ids)))}
    for row_id in ids:
        try:
            broker.enqueue(work.task, row_id, queues.get(row_id))
        except Exception as exc:  # any broker failure: the sweeper tries again
            logger.warning("%s %s not dispatched (the sweeper will retry): %s", work.table.__tablename__, row_id, exc)
            continue
        sent.append(row_id)
    if sent:
        session.execute(update(work.table).where(work.table.id.in_(sent)).values(dispatched_at=utcnow()))
        session.commit()
    return sent


def holder_gone(holder: str | None, heartbeat_at, lease_seconds: float) -> bool:
    """A row's holder ("host:pid") has stopped: its heartbeat is older than the lease, or it was a
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


def lost(session: Session, work: Work, redispatch_seconds: float, lease_seconds: float) -> list[str]:
    """Rows whose message is presumed lost: waiting and never sent, or sent `redispatch_seconds`
    ago and still not taken; held by a worker that is gone (a takeover is sent once per lease,
    not on every sweep while its message waits)."""
    now = utcnow()
    table = work.table
    query = select(table.id, table.claimed_by, table.heartbeat_at, table.dispatched_at).where(work.unfinished())
    if work.due is not None:
        query = query.where(or_(table.claimed_by.is_not(None), work.due()))
    rows = session.execute(query).all()
    stale_dispatch, recent = now - timedelta(seconds=redispatch_seconds), now - timedelta(seconds=lease_seconds)
    found = []
    for row in rows:
        if row.claimed_by is None:
            if row.dispatched_at is None or row.dispatched_at < stale_dispatch:
                found.append(row.id)
        elif holder_gone(row.claimed_by, row.heartbeat_at, lease_seconds) and (
            row.dispatched_at is None or row.dispatched_at < recent
        ):
            found.append(row.id)
    return found


def claim(session: Session, work: Work, row_id: str, me: str, lease_seconds: float) -> bool:
    """Hold a waiting row, or take over one whose holder is gone; False if another live worker
    holds it or it is finished. (Training claims its jobs itself: it also counts attempts and
    writes the job's events.)"""
    table, now = work.table, utcnow()
    taken = session.execute(
        update(table)
        .where(table.id == row_id, table.status == work.waiting, table.claimed_by.is_(None))
        .values(status=work.held, claimed_by=me, heartbeat_at=now)
    ).rowcount
    if not taken:
        row = session.execute(
            select(table.claimed_by, table.heartbeat_at).where(table.id == row_id, work.unfinished())
        ).first()
        if row is not None and row.claimed_by and holder_gone(row.claimed_by, row.heartbeat_at, lease_seconds):
            taken = session.execute(
                update(table)
                .where(table.id == row_id, work.unfinished(), table.claimed_by == row.claimed_by)
                .values(status=work.held, claimed_by=me, heartbeat_at=now)
            ).rowcount
    session.commit()
    return bool(taken)


def still_held(work: Work, row_id: str, me: str):
    """The condition for a holder's writes: the row is unfinished and still ours."""
    return work.table.id == row_id, work.unfinished(), work.table.claimed_by == me


@contextmanager
def heartbeat(work: Work, row_id: str, me: str, staging: Path) -> Iterator[None]:
    """Beat for a held row every HEARTBEAT_SECONDS from a thread while the body runs (ingest and
    export do their work in library calls with no hook to report from), until the row is no
    longer ours (deleted, or taken over: the body's final conditional write then does nothing).
    Each beat also touches the work's `staging` directory, so that the sweeper never takes it for
    a leftover."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            with suppress(FileNotFoundError):
                os.utime(staging)
            try:
                with session_scope() as session:
                    held = session.execute(
                        update(work.table).where(*still_held(work, row_id, me)).values(heartbeat_at=utcnow())
                    ).rowcount
                    session.commit()
            except Exception:  # a busy database: try again at the next beat
                logger.warning("heartbeat for %s failed", row_id, exc_info=True)
                continue
            if not held:
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{row_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def put_back(session: Session, work: Work, row_id: str, me: str) -> bool:
    """Give a held row back to waiting without sending it again now (a dependency such as the
    object store is down): the sweeper sends it again after `redispatch_seconds`. Whether it was
    still ours."""
    held = session.execute(
        update(work.table).where(*still_held(work, row_id, me)).values(status=work.waiting, claimed_by=None,
                                                                       dispatched_at=utcnow())  # fmt: skip
    ).rowcount
    session.commit()
    return bool(held)


def wait_for_store(work: Work, row_id: str, me: str, reason: str) -> str:
    """The object store cannot be reached: not the work's fault, so it does not fail; it goes back
    to waiting (put_back) until the sweeper sends it again."""
    logger.warning("%s waits for the object store: %s", row_id, reason)
    with session_scope() as session:
        put_back(session, work, row_id, me)
    return "waiting"


def release(holders: list[str]) -> list[str]:
    """Put the rows these worker processes hold back to waiting and send them at once, for a warm
    shutdown: each process stops at its next heartbeat (it no longer holds its row), and another
    worker picks the work up (a job from its last checkpoint) without waiting for a lease to run
    out. The ids released."""
    if not holders:
        return []
    released = []
    with session_scope() as session:
        for work in KINDS:
            table = work.table
            ids = session.scalars(select(table.id).where(work.unfinished(), table.claimed_by.in_(holders))).all()
            if not ids:
                continue
            session.execute(
                update(table)
                .where(table.id.in_(ids), work.unfinished(), table.claimed_by.in_(holders))
                .values(status=work.waiting, claimed_by=None, dispatched_at=None)
            )
            if work is TRAINING:  # a job's history shows why it moved
                session.add_all(JobEvent(job_id=job_id, type="status", data={"workers": holders},
                                         message="released by a worker shutting down: queued again") for job_id in ids)  # fmt: skip
            session.commit()
            released += dispatch(session, work, list(ids))
    return released

