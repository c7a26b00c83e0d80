"""The Celery worker: `visiontune worker` (training) or `visiontune worker --background` (ingests
and exports); or `celery -A workers.celery_app worker -Q training`.

Beside its pool it runs the sweeper (app/sweeper.py: lost messages are sent again) and, on a warm
shutdown (SIGTERM, as a deploy sends), releases the work its pool processes hold so that another
worker picks it up at once instead of after the lease.
"""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from celery.signals import after_setup_logger, after_setup_task_logger, worker_init, worker_ready, worker_shutting_down
from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from app.core import logs
from app.core.broker import get_celery
from app.core.config import get_settings
from app.core.objects import get_store
from app.core.outbox import release

celery_app = get_celery()
celery_app.conf.include = ["workers.tasks"]
_sweeper: subprocess.Popen | None = None


@worker_ready.connect
def _start_sweeper(sender, **_) -> None:
    global _sweeper
    # A process of its own, a fresh interpreter: this process forks the pool's processes, and a
    # fork must not copy a database connection in the middle of a transaction (SQLite's in-process
    # lock bookkeeping comes along, and the child then waits on a lock nobody holds). Not a
    # multiprocessing child either: the pool's processes would inherit it and try to join it.
    # It also announces the queues this worker consumes (a GPU job's events say when none does).
    queues = ",".join(sender.app.amqp.queues.consume_from)
    _sweeper = subprocess.Popen([sys.executable, "-m", "app.sweeper", queues])


@worker_init.connect
def _open_store(**_) -> None:
    # Before the pool's processes are forked (one per task): each then inherits the store's client
    # instead of importing boto3 and loading its S3 model again (0.25 s a task). It has made no
    # request, so there is no connection to share.
    get_store()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(**_) -> None:
    logs.configure(get_settings().log_format)


@worker_ready.connect
def _serve_metrics(**_) -> None:
    settings = get_settings()
    if settings.worker_metrics_port and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # set by `visiontune worker`
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(settings.worker_metrics_port, registry=registry)


@worker_shutting_down.connect
def _release_jobs(**_) -> threading.Thread:
    if _sweeper is not None:
        _sweeper.terminate()
    # The pool processes are this process's children; a row's holder is "host:pid" of one of them.
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    # Celery sends this signal from inside its SIGTERM handler, which may have interrupted the main
    # thread in the middle of a poll of the embedded broker, holding the lock that every SQLite call
    # of the broker takes (app/core/broker.py). Sending the released work takes that lock: on this
    # thread it would wait for itself, and the worker would never stop. A thread of its own waits
    # for the poll instead (not a daemon: the process's exit waits for it).
    releasing = threading.Thread(target=release, args=([f"{socket.gethostname()}:{pid}" for pid in children],),
                                 name="release-jobs")  # fmt: skip
    releasing.start()
    return releasing
