"""The object store behind STORAGE_URL, on a real S3 HTTP server (moto's, on 127.0.0.1): objects
go in and come back whole, a store that cannot be reached is reported, and the whole path from
upload to prediction keeps nothing durable on local disk (it is only a cache there)."""

import shutil
from pathlib import Path

import boto3
import pytest

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.objects import S3Store, StorageUnavailable, get_store
from app.datasets.service import local_dataset
from app.db.tables import Dataset
from app.datasets.runner import run_ingest
from app.jobs.runner import run_job
from tests.archives import colour_dataset_zip, zip_tree
from tests.conftest import HYMENOPTERA, free_port

pytestmark = pytest.mark.e2e  # an S3 server process


def bucket_keys(s3_server, storage_url: str) -> list[str]:
    bucket = storage_url.removeprefix("s3://").split("/")[0]
    client = boto3.client("s3", endpoint_url=s3_server.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_objects_go_in_and_come_back_whole(s3_storage, tmp_path):
    store = get_store()
    assert isinstance(store, S3Store) and not store.is_local
    store.check()
    source = tmp_path / "a.bin"
    source.write_bytes(b"x" * 3_000_000)
    store.put("things/one/a.bin", source)
    store.put("things/one/b/c.txt", source)
    assert store.keys("things/one") == ["things/one/a.bin", "things/one/b/c.txt"]
    assert store.keys("things/on") == []  # a prefix is a folder, not the start of a name
    store.get("things/one/a.bin", tmp_path / "back" / "a.bin")
    assert (tmp_path / "back" / "a.bin").read_bytes() == source.read_bytes()
    assert store.get_tree("things/one", tmp_path / "tree")
    assert sorted(p.relative_to(tmp_path / "tree").as_posix() for p in (tmp_path / "tree").rglob("*") if p.is_file()) == [
        "a.bin", "b/c.txt"]  # fmt: skip
    with pytest.raises(FileNotFoundError):
        store.get("things/none", tmp_path / "none")
    store.delete("things/one")
    assert store.keys("things/one") == []


def test_a_store_that_cannot_be_reached_is_reported(settings_env, monkeypatch):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import _clear_caches

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("VISIONTUNE_STORAGE_URL", "s3://nowhere/prefix")
    _clear_caches()
    with pytest.raises(StorageUnavailable):
        get_store().check()
    with TestClient(create_app()) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["storage"] is False
    assert "nowhere" in ready.json()["storage_error"]


def test_upload_to_prediction_with_nothing_durable_on_local_disk(s3_storage, s3_server, client, settings_env, tmp_path,
                                                                 monkeypatch):
    archive = zip_tree(HYMENOPTERA, tmp_path / "small.zip", per_class={"train": 6, "val": 4})
    accepted = client.post("/v1/datasets", files={"file": ("small.zip", archive.read_bytes())})
    assert accepted.status_code == 202, accepted.text
    dataset_id = accepted.json()["id"]
    assert bucket_keys(s3_server, s3_storage) == [f"visiontune/uploads/{dataset_id}"]
    assert not (settings_env / "uploads" / dataset_id).exists()  # the API kept no copy

    assert run_ingest(dataset_id) == "ready"  # fetched the archive from the store
    keys = bucket_keys(s3_server, s3_storage)
    images = [key for key in keys if key.startswith("visiontune/datasets/")]
    assert len(images) == 1 and not any("uploads/" in key for key in keys)  # its 20 images, as one object

    job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100",
                                        "strategy": "linear_probe", "hyperparameters": {"epochs": 2}}).json()  # fmt: skip
    sent = []
    original_put = S3Store.put
    monkeypatch.setattr(S3Store, "put", lambda store, key, path: (sent.append(key), original_put(store, key, path))[1])
    assert run_job(job["id"]).status == "succeeded"
    # Two quick epochs: shorter than CHECKPOINT_UPLOAD_SECONDS (60), so no checkpoint was sent
    # (tests/e2e/test_multi_host.py sets it to 0 and resumes from what was sent).
    assert not [key for key in sent if key.startswith("jobs/")]
    model_id = client.get(f"/v1/jobs/{job['id']}").json()["model_id"]
    keys = bucket_keys(s3_server, s3_storage)
    assert f"visiontune/models/{model_id}/model.safetensors" in keys
    assert not any(key.startswith(f"visiontune/jobs/{job['id']}") for key in keys)  # its checkpoint went with it

    # The local data directory is only a cache: empty it, and the model is fetched and served.
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
    ingested = files_of(local_dataset(get_settings(), dataset))
    assert len(ingested) == 20
    for folder in ("datasets", "models"):
        shutil.rmtree(settings_env / folder, ignore_errors=True)
    assert files_of(local_dataset(get_settings(), dataset)) == ingested  # unpacked again from that one object
    image = sorted((HYMENOPTERA / "val" / "bees").iterdir())[0]
    predicted = client.post(f"/v1/models/{model_id}/predict", files={"files": (image.name, image.read_bytes())})
    assert predicted.status_code == 200, predicted.text
    assert (settings_env / "models" / model_id / "model.safetensors").exists()

    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    assert bucket_keys(s3_server, s3_storage) == []  # deleting a dataset or model deletes its objects


def test_an_upload_the_store_refuses_is_503_and_leaves_nothing(s3_server, settings_env, monkeypatch):
    """The store answers but refuses the write (here: its bucket is gone): 503 naming the store,
    no dataset row, no file kept, and the server goes on serving."""
    from fastapi.testclient import TestClient

    from app.cli import create_key
    from app.main import create_app
    from tests.conftest import _clear_caches

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VISIONTUNE_STORAGE_URL", "s3://no-such-bucket/visiontune")
    _clear_caches()
    with TestClient(create_app()) as client:
        client.headers["Authorization"] = f"Bearer {create_key('default', ['admin'], 'tests')}"
        response = client.post("/v1/datasets", files={"file": ("c.zip", colour_dataset_zip())})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "storage_unavailable" and "no-such-bucket" in response.json()["error"]["message"]
        assert client.get("/v1/datasets").json()["data"] == []
        assert client.get("/healthz").status_code == 200
    kept = [p for folder in ("uploads", "staging", "datasets") for p in (settings_env / folder).rglob("*") if p.is_file()]
    assert kept == []
