"""Faults of the object store and of a worker's local disk (its data directory is only a cache
of a remote store). A full disk: the worker evicts its other local copies and tries again; if the
dataset still does not fit, the job fails with a clear `storage_full` error. A store that cannot
be reached: jobs, ingests and exports wait for it instead of failing. The store here is another
directory (file://); the full disk is a write that fails with ENOSPC, as a real full disk's would
(tests/faults mounts a real tmpfs for the upload path), and the unreachable store is boto3's
failure as app.core.objects reports it."""

import errno
import os
import shutil
import time

import pytest

from app.core import objects
from app.core.db import session_scope
from app.db.tables import Dataset
from app.jobs.runner import run_job
from tests.archives import colour_dataset_zip
from tests.uploads import upload_ready


@pytest.fixture
def shared_store(settings_env, tmp_path, monkeypatch):
    from tests.conftest import _clear_caches

    monkeypatch.setenv("VISIONTUNE_STORAGE_URL", (tmp_path / "store").as_uri())
    _clear_caches()


def test_a_full_disk_evicts_the_cache_then_fails_the_job_clearly(shared_store, client, settings_env, monkeypatch):
    dataset = upload_ready(client, colour_dataset_zip())
    with session_scope() as session:
        key = session.get(Dataset, dataset["id"]).content_key
    shutil.rmtree(settings_env / key)  # another machine: its cache does not hold this dataset
    old = settings_env / "datasets" / ("0" * 64)  # an older dataset in the cache
    old.mkdir(parents=True)
    (old / "image.jpg").write_bytes(b"x" * 1000)
    os.utime(old, (time.time() - 3600,) * 2)

    real_get_packed = objects.FileStore.get_packed

    def full_while_old_is_kept(store, object_key, into):
        if old.exists():
            raise OSError(errno.ENOSPC, "No space left on device", str(into))
        return real_get_packed(store, object_key, into)

    monkeypatch.setattr(objects.FileStore, "get_packed", full_while_old_is_kept)
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100",
                                        "strategy": "linear_probe", "hyperparameters": {"epochs": 1}}).json()  # fmt: skip
    assert run_job(job["id"]).status == "succeeded"
    assert not old.exists() and (settings_env / key).is_dir()  # evicted to make room, then fetched

    shutil.rmtree(settings_env / key)

    def always_full(store, object_key, into):
        raise OSError(errno.ENOSPC, "No space left on device", str(into))

    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100",
                                        "strategy": "linear_probe"}).json()  # fmt: skip
    with monkeypatch.context() as disk:  # full for this job only: the check after the test fetches again
        disk.setattr(objects.FileStore, "get_packed", always_full)
        assert run_job(job["id"]).status == "failed"
    failed = client.get(f"/v1/jobs/{job['id']}").json()
    assert failed["error"]["code"] == "storage_full" and "no room" in failed["error"]["message"]
    assert not any((settings_env / "staging").glob("fetch-*"))  # no half-fetched copy left


def test_work_waits_for_a_store_that_is_down_instead_of_failing(shared_store, client, settings_env, monkeypatch):
    """The object store cannot be reached: a job, an ingest and an export go back to waiting (the
    sweeper sends them again after REDISPATCH_SECONDS), none fails, none is lost."""
    from app.core.objects import StorageUnavailable
    from app.datasets.runner import run_ingest

    dataset = upload_ready(client, colour_dataset_zip())
    with session_scope() as session:
        key = session.get(Dataset, dataset["id"]).content_key
    shutil.rmtree(settings_env / key)  # this machine must fetch it

    def down(*_args, **_kwargs):
        raise StorageUnavailable("The object store cannot be reached: connection refused.")

    monkeypatch.setattr(objects.FileStore, "get", down)
    monkeypatch.setattr(objects.FileStore, "keys", down)
    # (linear_probe: a job looks in the store for a checkpoint to resume from before it trains)
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100",
                                        "strategy": "linear_probe"}).json()  # fmt: skip
    assert run_job(job["id"]).status == "queued"
    waiting = client.get(f"/v1/jobs/{job['id']}").json()
    assert waiting["status"] == "queued" and waiting["worker"] is None and waiting["error"] is None
    events = [e["message"] for e in client.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
    assert events[-1].startswith("queued again, waiting for the object store")

    other = client.post("/v1/datasets", files={"file": ("c.zip", colour_dataset_zip(6))}).json()
    assert not (settings_env / "uploads" / other["id"]).exists()  # the API keeps no copy: the worker fetches it
    assert run_ingest(other["id"]) == "waiting"
    assert client.get(f"/v1/datasets/{other['id']}").json()["status"] == "processing"
