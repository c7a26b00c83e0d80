"""The model registry over HTTP, in-process: versions under one name, lookups by id, `name@version`
and `name@alias`, aliases that move, the artifact download, the ONNX export and deletion.

The models are real: linear probes of mobilenetv2 on a few hymenoptera photos, trained by the
worker's own code in this process (no worker, no broker). Under load and across processes, the same
registry is exercised in tests/e2e."""

import zipfile

import onnx
import pytest
import timm

from app.jobs.runner import run_job
from app.models.runner import run_export
from tests.archives import zip_tree
from tests.conftest import BOTH_DATABASES, HYMENOPTERA
from tests.uploads import upload_ready

NAME = "pets"
# On SQLite and on a real PostgreSQL server.
pytestmark = pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)


def train(client, dataset_id: str, seed: int) -> dict:
    job = client.post("/v1/jobs", json={
        "dataset_id": dataset_id, "backbone": "mobilenetv2_100", "strategy": "linear_probe", "model_name": NAME,
        "seed": seed, "hyperparameters": {"epochs": 3},
    })  # fmt: skip
    assert job.status_code == 202, job.text
    assert run_job(job.json()["id"]).status == "succeeded"
    model_id = client.get(f"/v1/jobs/{job.json()['id']}").json()["model_id"]
    return client.get(f"/v1/models/{model_id}").json()


@pytest.fixture
def dataset_id(client, tmp_path) -> str:
    archive = zip_tree(HYMENOPTERA, tmp_path / "small.zip", per_class={"train": 6, "val": 5})
    return upload_ready(client, archive.read_bytes(), "small.zip")["id"]


def test_versions_aliases_and_delete(client, settings_env, dataset_id):
    first, second = train(client, dataset_id, seed=1), train(client, dataset_id, seed=2)
    assert (first["name"], first["version"]) == (NAME, 1) and (second["name"], second["version"]) == (NAME, 2)
    assert first["id"] != second["id"] and first["aliases"] == second["aliases"] == []
    assert first["backbone"] == "mobilenetv2_100" and first["classes"] == ["ants", "bees"]
    assert first["dataset_id"] == dataset_id and first["size_bytes"] > 1_000_000
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] in ([first["id"], second["id"]],
                                                                           [second["id"], first["id"]])  # fmt: skip

    # One model, three ways to name it.
    assert client.get(f"/v1/models/{NAME}@1").json() == first
    assert client.get(f"/v1/models/{NAME}@2").json() == second
    for unknown in (f"{NAME}@3", f"{NAME}@production", "other@1", f"model_{'0' * 24}"):
        response = client.get(f"/v1/models/{unknown}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found", unknown

    # An alias points at a version, moves atomically, and goes.
    moved = client.put(f"/v1/models/{NAME}/aliases/production", json={"version": 1})
    assert moved.status_code == 200
    assert moved.json() == {"name": NAME, "alias": "production", "version": 1, "model_id": first["id"]}
    assert client.get(f"/v1/models/{NAME}@production").json()["id"] == first["id"]
    assert client.get(f"/v1/models/{first['id']}").json()["aliases"] == ["production"]
    assert client.put(f"/v1/models/{NAME}/aliases/production", json={"version": 2}).json()["model_id"] == second["id"]
    assert client.get(f"/v1/models/{NAME}@production").json()["id"] == second["id"]
    assert client.get(f"/v1/models/{first['id']}").json()["aliases"] == []
    assert client.get(f"/v1/models/{second['id']}").json()["aliases"] == ["production"]
    assert client.put(f"/v1/models/{NAME}/aliases/staging", json={"version": 9}).status_code == 404

    # The version an alias points at cannot be deleted from under it: 409 naming the alias.
    refused = client.delete(f"/v1/models/{NAME}@2")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_has_aliases"
    assert f"{NAME}@production" in refused.json()["error"]["message"]
    assert client.get(f"/v1/models/{NAME}@production").json()["id"] == second["id"]
    assert client.delete(f"/v1/models/{NAME}/aliases/production").status_code == 204
    assert client.get(f"/v1/models/{NAME}@production").status_code == 404
    assert client.delete(f"/v1/models/{NAME}/aliases/production").status_code == 404

    # Deleting a version removes its row and its files; the other version stays.
    assert client.delete(f"/v1/models/{NAME}@2").status_code == 204
    assert client.get(f"/v1/models/{second['id']}").status_code == 404
    assert not (settings_env / "models" / second["id"]).exists()
    assert client.get(f"/v1/models/{NAME}@1").json() == first
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [first["id"]]
    assert client.delete(f"/v1/models/{second['id']}").status_code == 404

    # Version numbers are never given out twice: the next model after deleting version 2 is 3.
    third = train(client, dataset_id, seed=3)
    assert third["version"] == 3 and client.get(f"/v1/models/{NAME}@2").status_code == 404


def test_download_and_onnx_export(client, dataset_id, tmp_path):
    model = train(client, dataset_id, seed=0)
    url = f"/v1/models/{model['id']}"

    # The download is the artifact timm itself loads: its config carries the labels.
    download = client.get(f"{url}/download")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    archive = tmp_path / "model.zip"
    archive.write_bytes(download.content)
    with zipfile.ZipFile(archive) as opened:
        assert {"config.json", "model.safetensors", "metrics.json"} <= {n.split("/", 1)[1] for n in opened.namelist()}
        opened.extractall(tmp_path)
    loaded = timm.create_model(f"local-dir:{tmp_path / model['id']}", pretrained=True)
    assert loaded.pretrained_cfg["label_names"] == ["ants", "bees"] and loaded.num_classes == 2

    # No export until one is asked for; then it is made once and kept (a model is immutable).
    missing = client.get(f"{url}/exports/onnx")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "export_not_found"
    assert client.post(f"{url}/exports", json={"format": "tflite"}).status_code == 422
    created = client.post(f"{url}/exports", json={"format": "onnx"})
    assert created.status_code == 202, created.text
    assert created.json()["status"] == "processing" and created.headers["location"] == f"{url}/exports/onnx"
    assert client.post(f"{url}/exports", json={"format": "onnx"}).json()["id"] == created.json()["id"]  # one export
    assert client.get(f"{url}/exports/onnx/download").json()["error"]["code"] == "export_not_ready"
    assert run_export(created.json()["id"]) == "ready"  # the worker's own code, in this process
    assert run_export(created.json()["id"]) == "not_held"  # a duplicate message does nothing
    export = client.get(f"{url}/exports/onnx").json()
    assert export["status"] == "ready" and export["error"] is None
    assert export["model_id"] == model["id"] and export["format"] == "onnx" and export["size_bytes"] > 1_000_000
    assert export["parity"]["passed"] and export["parity"]["images"] == 10  # the job's validation images
    again = client.post(f"{url}/exports", json={"format": "onnx"})
    assert again.status_code == 200 and again.json() == export
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(client.get(f"{url}/exports/onnx/download").content)
    metadata = {prop.key: prop.value for prop in onnx.load(str(onnx_file)).metadata_props}
    assert metadata["label_names"] == '["ants", "bees"]'

    assert client.delete(url).status_code == 204
    assert client.get(f"{url}/exports/onnx").status_code == 404
