"""Tenants, keys, scopes and quotas, in-process with a real trained model: another tenant's ids
answer 404 on every endpoint, keys are stored only as hashes, quotas refuse with nothing stored."""

import random
import re
import zipfile

import pytest

from app.db.tables import Dataset, Job
from app.jobs.runner import run_job
from app.models.runner import run_export
from tests.archives import zip_tree
from tests.conftest import BOTH_DATABASES, HYMENOPTERA
from tests.uploads import ingest

# On SQLite and on a real PostgreSQL server.
pytestmark = pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)

IMAGE = sorted((HYMENOPTERA / "val" / "bees").iterdir())[0]


@pytest.fixture
def archive(tmp_path):
    return zip_tree(HYMENOPTERA, tmp_path / "small.zip", per_class={"train": 6, "val": 5})


def new_tenant(client, name: str, scopes=("admin",), **quotas) -> tuple[dict, dict]:
    tenant = client.post("/v1/admin/tenants", json={"name": name, **quotas})
    assert tenant.status_code == 201, tenant.text
    key = client.post(f"/v1/admin/tenants/{tenant.json()['id']}/keys", json={"name": name, "scopes": list(scopes)})
    assert key.status_code == 201, key.text
    return tenant.json(), {"Authorization": f"Bearer {key.json()['key']}"}


def post_archive(client, headers, archive):
    return client.post("/v1/datasets", headers=headers, files={"file": ("small.zip", archive.read_bytes())})


def upload(client, headers, archive) -> dict:
    """The dataset, accepted and ingested (by the worker's own code, in this process)."""
    return ingest(client, post_archive(client, headers, archive))


def test_every_endpoint_answers_404_for_another_tenants_ids(client, archive, monkeypatch):
    from app.core.config import get_settings

    _, alice = new_tenant(client, "alice")
    _, bob = new_tenant(client, "bob")
    monkeypatch.setenv("VISIONTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", "true")  # a webhook to 127.0.0.1 (never sent here)
    get_settings.cache_clear()
    webhook = client.post("/v1/webhooks", headers=alice, json={"url": "http://127.0.0.1:9/", "events": ["model.exported"]})
    dataset = upload(client, alice, archive)
    job = client.post("/v1/jobs", headers=alice, json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100",
                                                       "strategy": "linear_probe", "model_name": "pets"}).json()  # fmt: skip
    run_job(job["id"])  # the worker's own code, in this process
    model = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert model["status"] == "succeeded", model
    assert client.put("/v1/models/pets/aliases/production", headers=alice, json={"version": 1}).status_code == 200
    sweep = client.post("/v1/sweeps", headers=alice, json={"dataset_id": dataset["id"], "backbones": ["mobilenetv2_100"]}).json()
    alice_key = client.get("/v1/keys", headers=alice).json()["data"][0]["id"]
    export = client.post(f"/v1/models/{model['model_id']}/exports", headers=alice, json={"format": "onnx"}).json()
    assert run_export(export["id"]) == "ready"
    [delivery] = client.get(f"/v1/webhooks/{webhook.json()['id']}/deliveries", headers=alice).json()["data"]
    alice_ids = {"dataset_id": dataset["id"], "job_id": job["id"], "sweep_id": sweep["id"], "name": "pets",
                 "alias": "production", "key_id": alice_key, "format": "onnx", "webhook_id": webhook.json()["id"],
                 "delivery_id": delivery["id"], "path": f"val/bees/{IMAGE.name}"}  # fmt: skip
    model_refs = [model["model_id"], "pets@1", "pets@production"]
    bodies = {
        "/predict": {"files": {"files": (IMAGE.name, IMAGE.read_bytes())}},
        "/embed": {"files": {"files": (IMAGE.name, IMAGE.read_bytes())}},
        "/exports": {"json": {"format": "onnx"}},
        "/aliases/{alias}": {"json": {"version": 1}},
        "/promote": {"json": {"backbone": "mobilenetv2_100"}},
    }

    probes, probed_routes = 0, set()
    for template, operations in client.app.openapi()["paths"].items():  # every endpoint the app has
        params = re.findall(r"{(\w+)}", template)
        if not params or template.startswith("/v1/admin"):
            continue
        for method in operations:
            for ref in model_refs if "model_id" in params else [None]:
                path = template.format(**alice_ids, model_id=ref)
                body = next((b for suffix, b in bodies.items() if template.endswith(suffix) and method != "delete"), {})
                response = client.request(method.upper(), path, headers=bob, **body)
                assert response.status_code == 404, (method, path, response.status_code, response.text)
                assert "alice" not in response.text
                probes += 1
                probed_routes.add((method, template))
    # Objects referred to inside bodies, too.
    for path, body in (("/v1/jobs", {"dataset_id": dataset["id"], "backbone": "mobilenetv2_100"}),
                       ("/v1/sweeps", {"dataset_id": dataset["id"], "backbones": ["mobilenetv2_100"]})):  # fmt: skip
        assert client.post(path, headers=bob, json=body).status_code == 404
        probes += 1
    for listing in ("/v1/datasets", "/v1/jobs", "/v1/models", "/v1/sweeps"):
        assert client.get(listing, headers=bob).json()["data"] == []
        assert client.get(listing, headers=alice).json()["data"] != []
        probes += 1
    print(f"cross-tenant probes: {probes} over {len(probed_routes)} endpoint methods, 0 answered other than 404")
    assert len(probed_routes) >= 18  # every endpoint with an id in its path
    # Nothing of alice's changed: bob's deletes, cancels, pauses, key revocations and alias moves were all 404s.
    assert client.get("/v1/keys", headers=alice).json()["data"][0]["revoked_at"] is None
    assert client.get(f"/v1/models/{model['model_id']}", headers=alice).json()["aliases"] == ["production"]
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 200


def _every_row() -> list:
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.db.tables import Base

    with session_scope() as session:
        return [row for table in Base.metadata.sorted_tables for row in session.execute(select(table)).all()]


def test_keys_are_shown_once_stored_hashed_scoped_and_revocable(client, settings_env, archive):
    tenant, admin = new_tenant(client, "team-a")
    created = client.post(f"/v1/admin/tenants/{tenant['id']}/keys", json={"name": "ci", "scopes": ["read"]}).json()
    key = created["key"]
    assert key.startswith(created["prefix"] + "_")
    listed = client.get(f"/v1/admin/tenants/{tenant['id']}/keys").json()["data"]
    assert all("key" not in k and "key_hash" not in k for k in listed) and created["prefix"] in {k["prefix"] for k in listed}
    stored = " ".join(str(row) for row in _every_row())  # every value of every table
    assert created["prefix"] in stored and key not in stored and key.split("_", 2)[2] not in stored

    reader = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/datasets", headers=reader).status_code == 200
    refused = post_archive(client, reader, archive)
    assert refused.status_code == 403 and "'train'" in refused.json()["error"]["message"]
    assert client.get("/v1/admin/tenants", headers=reader).status_code == 403
    assert client.get("/v1/me", headers=reader).json()["key"]["scopes"] == ["read"]

    for bad in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {key}x"}, {"Authorization": "Basic abc"}):
        response = client.get("/v1/datasets", headers={"Authorization": ""} | bad)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", bad
    assert client.delete(f"/v1/admin/keys/{created['id']}").json()["revoked_at"] is not None
    assert client.get("/v1/datasets", headers=reader).status_code == 401


def test_quotas_refuse_with_the_quota_named_and_nothing_stored(client, settings_env, archive):
    from app.core.db import session_scope

    tenant, headers = new_tenant(client, "small", max_concurrent_jobs=1, max_models=5)
    dataset = upload(client, headers, archive)
    job = {"dataset_id": dataset["id"], "backbone": "mobilenetv2_100", "strategy": "linear_probe"}
    assert client.post("/v1/jobs", headers=headers, json=job).status_code == 202
    second = client.post("/v1/jobs", headers=headers, json=job)
    assert second.status_code == 429 and second.json()["error"]["details"][0]["quota"] == "max_concurrent_jobs"
    sweep = client.post("/v1/sweeps", headers=headers, json={"dataset_id": dataset["id"], "backbones": ["mobilenetv2_100"]})
    assert sweep.status_code == 429 and client.get("/v1/sweeps", headers=headers).json()["data"] == []
    with session_scope() as session:
        assert session.query(Job).filter_by(tenant_id=tenant["id"]).count() == 1

    # Stored bytes: the next upload would pass the limit, so it is refused and leaves nothing.
    client.patch(f"/v1/admin/tenants/{tenant['id']}", json={"max_stored_bytes": dataset["size_bytes"] + 10})
    datasets_before = sorted((settings_env / "datasets").iterdir())
    over = post_archive(client, headers, archive)
    assert over.status_code == 429 and "max_stored_bytes" in over.json()["error"]["message"]
    assert sorted((settings_env / "datasets").iterdir()) == datasets_before
    with session_scope() as session:
        assert session.query(Dataset).filter_by(tenant_id=tenant["id"]).count() == 1
    # An upload that declares more than the room left is refused before its body is read.
    body = archive.read_bytes()
    pulled = []

    def chunks():
        for start in range(0, len(body), 4096):
            pulled.append(start)
            yield body[start : start + 4096]

    early = client.post("/v1/datasets", headers={**headers, "Content-Type": "multipart/form-data; boundary=x",
                                                 "Content-Length": str(len(body))}, content=chunks())  # fmt: skip
    assert early.status_code == 429 and early.json()["error"]["details"][0]["quota"] == "max_stored_bytes"
    assert len(pulled) <= 1, f"{len(pulled)} chunks of the body were read before the refusal"
    me = client.get("/v1/me", headers=headers).json()["tenant"]
    assert me["usage"] == {"stored_bytes": dataset["size_bytes"], "concurrent_jobs": 1, "models": 0}
    assert me["limits"]["max_concurrent_jobs"] == 1


def test_the_storage_quota_is_checked_again_on_the_uncompressed_size(client, settings_env, tmp_path):
    """An archive that fits the quota as sent, but not once unpacked, fails before its ingest
    writes a byte of it. (Four-letter random text: it deflates about four times, well under the
    compression-bomb limit, and is real data a zip holds; it is dropped later as not an image.)"""
    text = "".join(random.Random(0).choice("acgt") for _ in range(2_000_000)).encode()
    archive = zip_tree(HYMENOPTERA, tmp_path / "dna.zip", per_class={"train": 3, "val": 2})
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as opened:
        opened.writestr("ants/sequence.txt", text)
    tenant, headers = new_tenant(client, "tight", max_stored_bytes=archive.stat().st_size + 100_000)
    dataset = upload(client, headers, archive)
    assert dataset["status"] == "failed" and dataset["error"]["code"] == "quota_exceeded", dataset
    assert "max_stored_bytes" in dataset["error"]["message"] and dataset["size_bytes"] == 0
    assert not (settings_env / "datasets" / dataset["id"]).exists()
    assert client.get("/v1/me", headers=headers).json()["tenant"]["usage"]["stored_bytes"] == 0
