"""The Celery worker: `visiontune worker` (or `celery -A workers.celery_app worker -Q training`).

Its main process also runs the jobs sweeper (app/jobs/dispatch.py: lost messages are sent again)
and, on a warm shutdown (SIGTERM, as a deploy sends), releases the jobs its pool processes hold so
that another worker resumes them at once instead of after the lease.
"""

import os
import socket
from pathlib import Path

from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from app.core.broker import get_celery
from app.core.config import get_settings
from app.core.db import get_engine
from app.jobs.dispatch import Sweeper, release

celery_app = get_celery()
celery_app.conf.include = ["workers.tasks"]
_sweeper: Sweeper | None = None


@worker_ready.connect
def _start_sweeper(**_) -> None:
    global _sweeper
    _sweeper = Sweeper(get_settings(), holder=f"{socket.gethostname()}:{os.getpid()}")
    _sweeper.start()


@worker_process_init.connect
def _fresh_connections(**_) -> None:
    # A pool process is forked from this one, whose sweeper holds database connections: start
    # with an empty pool of its own rather than share them (SQLAlchemy's rule for fork).
    get_engine().dispose(close=False)


@worker_shutting_down.connect
def _release_jobs(**_) -> None:
    if _sweeper is not None:
        _sweeper.stop()
    # The pool processes are this process's children; a job's holder is "host:pid" of one of them.
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    release([f"{socket.gethostname()}:{pid}" for pid in children])
