"""The Celery application, configured from Settings, shared by the API (which only enqueues, by
task name) and the worker (workers/celery_app.py, which registers the task bodies)."""

import os
import sqlite3
import threading
from functools import lru_cache

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as sqlalchemy_transport
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError, OperationalError

from app.core.config import Settings, get_settings

FINETUNE_TASK = "visiontune.run_finetune"
INGEST_TASK = "visiontune.ingest_dataset"
EXPORT_TASK = "visiontune.export_model"
AUDIT_TASK = "visiontune.audit_dataset"
WEBHOOK_TASK = "visiontune.deliver_webhook"


# Held by every call into SQLite through the embedded broker, and by every fork. A Celery worker's
# main thread polls the broker 5 times a second while its pool's supervisor thread forks a fresh
# process for each task. A fork that lands while the poll is inside SQLite's C code copies SQLite's
# mutexes locked, and the new process then hangs on its first SQLite call, holding its task's
# message forever (seen in CI: an ingest that never started). A fork now waits for the call.
_SQLITE_CALL = threading.Lock()
os.register_at_fork(before=_SQLITE_CALL.acquire, after_in_parent=_SQLITE_CALL.release,
                    after_in_child=_SQLITE_CALL.release)  # fmt: skip


def _one_at_a_fork(method):
    def guarded(self, *args, **kwargs):
        with _SQLITE_CALL:
            return method(self, *args, **kwargs)

    return guarded


class _ForkSafeCursor(sqlite3.Cursor):
    """The sqlite3 cursor, each call that releases the GIL into SQLite made under _SQLITE_CALL."""

    execute = _one_at_a_fork(sqlite3.Cursor.execute)
    executemany = _one_at_a_fork(sqlite3.Cursor.executemany)
    fetchone = _one_at_a_fork(sqlite3.Cursor.fetchone)
    fetchmany = _one_at_a_fork(sqlite3.Cursor.fetchmany)
    fetchall = _one_at_a_fork(sqlite3.Cursor.fetchall)
    close = _one_at_a_fork(sqlite3.Cursor.close)


class ForkSafeSQLite(sqlite3.Connection):
    """The sqlite3 connection (its `factory`), opened, used and closed under _SQLITE_CALL."""

    __init__ = _one_at_a_fork(sqlite3.Connection.__init__)
    execute = _one_at_a_fork(sqlite3.Connection.execute)
    commit = _one_at_a_fork(sqlite3.Connection.commit)
    rollback = _one_at_a_fork(sqlite3.Connection.rollback)
    close = _one_at_a_fork(sqlite3.Connection.close)

    def cursor(self, factory=_ForkSafeCursor):
        return super().cursor(factory)


class EmbeddedBrokerChannel(sqlalchemy_transport.Channel):
    """kombu's SQLAlchemy channel, safe when processes start on the same database at once. kombu
    guards creating its tables, and a queue row's select-then-insert, with a lock of its own
    process only: of two workers that started together, one created the queue row and the other
    crashed at start on the unique name (seen in a fault test: two background workers on the
    embedded broker). The loser now uses what the winner created. Its SQLite connections are
    ForkSafeSQLite's."""

    def _engine_from_config(self):
        # kombu's own hands the transport options to create_engine; the embedded broker sets none.
        return create_engine(self.connection.client.hostname, connect_args={"factory": ForkSafeSQLite})

    def _open(self):
        # "table ... already exists": another process created it between kombu's check and its
        # create. Each race lost leaves one more of kombu's two tables in place, so this ends.
        for _ in range(2):
            try:
                return super()._open()
            except OperationalError as error:
                if "already exists" not in str(error):
                    raise
        return super()._open()

    def _get_or_create(self, queue):
        try:
            return super()._get_or_create(queue)
        except IntegrityError:
            self.session.rollback()
            return self.session.query(self.queue_cls).filter(self.queue_cls.name == queue).one()


class EmbeddedBrokerTransport(sqlalchemy_transport.Transport):
    """kombu's SQLAlchemy transport, polling its tables 5 times a second instead of once: every
    upload and job takes a hop through it, and a second's wait per hop was an eighth of the time
    from upload to a served probe. (It hands every transport option to create_engine, so the
    interval cannot be set through broker_transport_options.) An idle poll is one small SQLite
    transaction per queue."""

    polling_interval = 0.2
    Channel = EmbeddedBrokerChannel


def make_celery(settings: Settings) -> Celery:
    broker_url = settings.broker_url
    if broker_url.startswith("sqla+sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        TRANSPORT_ALIASES["visiontune-sqla"] = f"{__name__}:EmbeddedBrokerTransport"
        broker_url = "visiontune-sqla+" + broker_url.removeprefix("sqla+")
    celery = Celery("visiontune", broker=broker_url)
    celery.conf.update(
        task_default_queue=settings.training_queue,
        # Training on its own queue (a worker per device, one job at a time); ingests, exports and
        # audits on theirs, taken by a background worker, so an upload never waits behind an hour
        # of training.
        task_routes={
            FINETUNE_TASK: {"queue": settings.training_queue},
            INGEST_TASK: {"queue": settings.ingest_queue},
            EXPORT_TASK: {"queue": settings.export_queue},
            AUDIT_TASK: {"queue": settings.audit_queue},
            WEBHOOK_TASK: {"queue": settings.webhook_queue},
        },
        # The job's truth is in the database; the broker only carries "run job X".
        task_ignore_result=True,
        # One job at a time per worker process, and never lose one: acknowledge only when the
        # task is over, and put the message back if the process running it dies.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A fresh child per job returns all training memory to the system.
        worker_max_tasks_per_child=1,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        # Task events, so that Flower (or `celery events`) can watch the workers through the broker.
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    if settings.broker_url.startswith(("redis", "rediss")):
        # How long a message taken by a worker that vanished stays invisible before redelivery.
        # (The SQLAlchemy transport hands its options to create_engine, so only Redis gets this.)
        celery.conf.broker_transport_options = {"visibility_timeout": settings.broker_visibility_timeout}
    return celery


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def training_queue(accelerator: str) -> str:
    """`training` for jobs any worker may run; `training.gpu`, `training.cpu` for the others."""
    base = get_settings().training_queue
    return base if accelerator == "any" else f"{base}.{accelerator}"


def enqueue(task: str, row_id: str, queue: str | None = None) -> None:
    """Send "do row X" (to `queue`, or the task's own queue)."""
    get_celery().send_task(task, args=[row_id], queue=queue)


def queue_depths() -> dict[str, int]:
    """Messages waiting in each of our queues (a queue the broker has never seen holds none)."""
    settings, depths = get_settings(), {}
    with get_celery().connection_for_read() as connection:
        channel = connection.default_channel
        for queue in (settings.training_queue, settings.ingest_queue, settings.export_queue, settings.audit_queue,
                      settings.webhook_queue):
            try:
                depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except connection.channel_errors:
                depths[queue] = 0
    return depths


def broker_reachable() -> bool:
    try:
        with get_celery().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:  # any failure to connect means "not ready"
        return False
