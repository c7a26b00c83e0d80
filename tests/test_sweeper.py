"""The outbox's pieces in-process, on the real database and embedded broker: the sweeper's lease,
what it sends again, and the files it collects. (tests/faults runs them against killed processes.)"""

import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.leases import take_lease
from app.db.tables import Audit, Dataset, Job, utcnow
from app import sweeper
from tests.archives import colour_dataset_zip
from tests.conftest import BOTH_DATABASES
from tests.uploads import upload_ready

# On SQLite and on a real PostgreSQL server.
pytestmark = pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)


def test_one_holder_at_a_time_until_the_lease_runs_out(client):
    with session_scope() as session:
        assert take_lease(session, "sweeper", "a", 60)
        assert not take_lease(session, "sweeper", "b", 60)
        assert take_lease(session, "sweeper", "a", 0.001)  # renewed by its holder (briefly)
        time.sleep(0.01)
        assert take_lease(session, "sweeper", "b", 0.001)  # a's ran out
        time.sleep(0.01)
        assert take_lease(session, "sweeper", "a", 60)  # b's ran out


def test_the_sweeper_sends_lost_jobs_again_and_leaves_the_rest(client):
    settings = get_settings()
    dataset = upload_ready(client, colour_dataset_zip())
    ids = [client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100",
                                         "strategy": "linear_probe"}).json()["id"] for _ in range(4)]  # fmt: skip
    never_sent, sent_long_ago, orphaned, healthy = ids
    long_ago = utcnow() - timedelta(hours=2)
    with session_scope() as session:
        session.query(Job).filter(Job.id == never_sent).update({"dispatched_at": None})
        session.query(Job).filter(Job.id == sent_long_ago).update({"dispatched_at": long_ago})
        session.query(Job).filter(Job.id == orphaned).update(
            {"status": "running", "claimed_by": "elsewhere:1", "heartbeat_at": long_ago, "dispatched_at": long_ago})
        session.query(Job).filter(Job.id == healthy).update(
            {"status": "running", "claimed_by": "elsewhere:2", "heartbeat_at": utcnow(), "dispatched_at": long_ago})
    # Ingests are rows too: one whose message never went out, one whose worker vanished mid-way,
    # and one being ingested right now.
    waiting, abandoned, busy = (
        client.post("/v1/datasets", files={"file": ("c.zip", colour_dataset_zip())}).json()["id"] for _ in range(3)
    )
    with session_scope() as session:
        session.query(Dataset).filter(Dataset.id == waiting).update({"dispatched_at": None})
        session.query(Dataset).filter(Dataset.id == abandoned).update(
            {"claimed_by": "elsewhere:3", "heartbeat_at": long_ago, "dispatched_at": long_ago})
        session.query(Dataset).filter(Dataset.id == busy).update(
            {"claimed_by": "elsewhere:4", "heartbeat_at": utcnow(), "dispatched_at": long_ago})
    # And so are audits: one whose worker vanished mid-way.
    audit = client.get(f"/v1/datasets/{dataset['id']}/audit").json()["id"]
    with session_scope() as session:
        session.query(Audit).filter(Audit.id == audit).update(
            {"claimed_by": "elsewhere:5", "heartbeat_at": long_ago, "dispatched_at": long_ago})
    assert sorted(sweeper.sweep(settings, "sweeper-1")) == sorted([never_sent, sent_long_ago, orphaned, waiting, abandoned,
                                                                   audit])  # fmt: skip
    assert sweeper.sweep(settings, "sweeper-2") == []  # the lease: one sweeper at a time
    assert sweeper.sweep(settings, "sweeper-1") == []  # sent just now: not again


def test_files_no_row_owns_are_collected_once_old_enough(client):
    settings = get_settings()
    dataset = upload_ready(client, colour_dataset_zip())
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100"}).json()
    old = time.time() - 7200
    with session_scope() as session:
        images = settings.data_dir / session.get(Dataset, dataset["id"]).content_key  # datasets/<sha256>
    paths = {
        "owned dataset": images,
        "orphan dataset": settings.datasets_dir / "ds_orphan",
        "orphan artifact": settings.models_dir / "model_orphan",
        "orphan export": settings.exports_dir / "model_orphan",
        "orphan int8 export": settings.data_dir / "exports-onnx-int8" / "model_orphan",
        "queued job's checkpoint": settings.jobs_dir / job["id"],
        "unknown job's checkpoint": settings.jobs_dir / "job_orphan",
        "staging leftover": settings.staging_dir / "upload-orphan",
        "orphan archive": settings.uploads_dir / "ds_gone",
        "ingested dataset's archive": settings.uploads_dir / dataset["id"],
    }
    for name, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        os.utime(path, (old, old))
    young = settings.models_dir / "model_young"  # being moved into place right now
    young.mkdir()
    with session_scope() as session:
        removed = sweeper.collect_orphans(session, settings, older_than=3600)
    assert sorted(removed) == sorted(["ds_orphan", "model_orphan", "model_orphan", "model_orphan", "job_orphan",
                                      "upload-orphan", "ds_gone", dataset["id"]])  # fmt: skip
    kept = {name for name, path in paths.items() if path.exists()}
    assert kept == {"owned dataset", "queued job's checkpoint"} and young.exists()


def test_a_job_for_a_gpu_waits_and_says_so_while_no_gpu_worker_runs(client):
    from app.core import broker

    settings = get_settings()
    dataset = upload_ready(client, colour_dataset_zip())
    body = {"dataset_id": dataset["id"], "backbone": "mobilenetv2_100", "strategy": "linear_probe"}
    gpu = client.post("/v1/jobs", json=body | {"accelerator": "gpu"}).json()
    anywhere = client.post("/v1/jobs", json=body).json()
    assert gpu["accelerator"] == "gpu" and broker.training_queue("gpu") == "training.gpu"

    def notes(job_id: str) -> list[str]:
        return [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events").json()["data"] if "waiting for" in e["message"]]

    # A CPU worker runs (its sweeper announces its queues): the GPU job is told, once; the other is not.
    sweeper.sweep(settings, "host:1", queues=["training", "training.cpu"])
    sweeper.sweep(settings, "host:1", queues=["training", "training.cpu"])
    assert notes(gpu["id"]) == ["waiting for a gpu worker: none is running"] and notes(anywhere["id"]) == []
    assert client.get(f"/v1/jobs/{gpu['id']}").json()["status"] == "queued"  # not failed, not run on a CPU
    # Once a GPU worker runs, a new GPU job is not told anything.
    sweeper.sweep(settings, "host:1", queues=["training", "training.gpu"])
    later = client.post("/v1/jobs", json=body | {"accelerator": "gpu"}).json()
    sweeper.sweep(settings, "host:1", queues=["training", "training.gpu"])
    assert notes(later["id"]) == []


def test_a_sigterm_in_the_middle_of_a_broker_poll_still_releases_what_the_pool_holds(client):
    """A worker's warm shutdown puts the rows its pool processes hold back to waiting and sends
    them again (workers/celery_app.py). Celery runs that inside its SIGTERM handler, which can
    interrupt the main thread while it holds the embedded broker's SQLite lock, mid-poll."""
    from app.core import broker
    from workers.celery_app import _release_jobs

    dataset = client.post("/v1/datasets", files={"file": ("c.zip", colour_dataset_zip())}).json()["id"]
    pool_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a child, as the pool's are
    try:
        with session_scope() as session:
            holder = f"{socket.gethostname()}:{pool_process.pid}"
            session.query(Dataset).filter(Dataset.id == dataset).update(
                {"claimed_by": holder, "heartbeat_at": utcnow(), "dispatched_at": None})
        releasing = []

        def sigterm_mid_poll():  # the signal handler runs on the thread it interrupted, which holds the lock
            with broker._SQLITE_CALL:
                releasing.append(_release_jobs())

        interrupted = threading.Thread(target=sigterm_mid_poll, daemon=True)
        interrupted.start()
        interrupted.join(timeout=30)
        assert not interrupted.is_alive(), "the release waits for the broker lock that its own thread holds"
        releasing[0].join(timeout=60)
        assert not releasing[0].is_alive()
    finally:
        pool_process.kill()
        pool_process.wait()
    with session_scope() as session:
        row = session.get(Dataset, dataset)
        assert row.status == "processing" and row.claimed_by is None and row.dispatched_at is not None  # sent again
