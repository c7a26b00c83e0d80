"""The embedded broker (kombu's SQLAlchemy transport on SQLite, app/core/broker.py) with real
processes on one database file."""

import multiprocessing
import sqlite3

from kombu import Queue

from app.core.broker import make_celery
from app.core.config import Settings

PROCESSES = 8


def _declare(data_dir: str, queue: str, barrier=None) -> None:
    settings = Settings(data_dir=data_dir, broker_url=f"sqla+sqlite:///{data_dir}/broker.db")
    with make_celery(settings).connection_for_write() as connection:
        channel = connection.default_channel
        if barrier is not None:
            barrier.wait(timeout=60)  # every process connected: they declare at the same moment
        Queue(queue, channel=channel).declare()


def test_processes_that_declare_a_new_queue_at_once_all_start(tmp_path):
    """Workers that start together on a fresh database create kombu's tables and declare the same
    queues: kombu guards both with a lock of its own process only, and the losers of the race
    crashed. The first round races on the tables too (a fresh broker database)."""
    context = multiprocessing.get_context("spawn")
    for attempt in range(3):
        barrier = context.Barrier(PROCESSES)
        processes = [context.Process(target=_declare, args=(str(tmp_path), f"race-{attempt}", barrier))
                     for _ in range(PROCESSES)]  # fmt: skip
        for process in processes:
            process.start()
        for process in processes:
            process.join(120)
        assert [p.exitcode for p in processes] == [0] * PROCESSES
    with sqlite3.connect(tmp_path / "broker.db") as db:
        names = [name for (name,) in db.execute("SELECT name FROM kombu_queue")]
    assert sorted(names) == ["race-0", "race-1", "race-2"]
