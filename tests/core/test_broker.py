"""The embedded broker (kombu's SQLAlchemy transport on SQLite, app/core/broker.py) with real
processes on one database file."""

import multiprocessing
import os
import signal
import sqlite3
import threading
import time

from kombu import Queue
from sqlalchemy import text

from app.core.broker import make_celery
from app.core.config import Settings

PROCESSES = 8
COUNT_TO = text("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) SELECT count(*) FROM c")


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


def _forks_that_hang(data_dir, forks: int) -> int:
    """Fork `forks` times while another thread polls the broker, as a Celery worker's main thread
    does while its pool's supervisor thread forks a process per task. Each child opens an SQLite
    database, as a task does first. How many children hang (killed after 5 s)?"""
    settings = Settings(data_dir=data_dir, broker_url=f"sqla+sqlite:///{data_dir}/broker.db")
    stop = threading.Event()

    def poll():
        with make_celery(settings).connection_for_write() as connection:
            queue = Queue("polled", channel=connection.default_channel)
            queue.declare()
            session = connection.default_channel.session
            while not stop.is_set():
                queue.queue_declare(passive=True)  # counts the waiting messages, as a poll does
                # A query that keeps SQLite busy for a while, so that forks land inside SQLite often
                session.execute(COUNT_TO).all()
                session.commit()

    poller = threading.Thread(target=poll)
    poller.start()
    hung = 0
    try:
        time.sleep(1)  # polling
        for _ in range(forks):
            pid = os.fork()
            if pid == 0:
                sqlite3.connect(data_dir / "app.db").execute("SELECT 1").fetchall()
                os._exit(0)
            deadline = time.monotonic() + 5
            while not os.waitpid(pid, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    hung += 1
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.001)
    finally:
        stop.set()
        poller.join()
    return hung


def test_a_fork_while_the_broker_is_polled_never_hangs_its_child(tmp_path):
    """Without the guard around the broker's SQLite calls (with kombu's own engine), 42 of these 200
    forks copied a lock that SQLite held, and the child hung on its first SQLite call."""
    assert _forks_that_hang(tmp_path, 200) == 0
