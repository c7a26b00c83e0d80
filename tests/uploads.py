"""Datasets uploaded in-process. POST /v1/datasets stores the archive and answers 202 `processing`;
a worker ingests it. In-process tests run that worker's own code (`run_ingest`) right here, as
they run `run_job` for training; tests/e2e and tests/faults run real background workers."""

import httpx

from app.datasets.runner import run_ingest


def ingest(client, response: httpx.Response) -> dict:
    """Run the ingest of an accepted upload; the dataset as GET answers it then (ready or failed)."""
    assert response.status_code == 202, response.text
    dataset = response.json()
    assert dataset["status"] == "processing"
    run_ingest(dataset["id"])
    headers = {"Authorization": response.request.headers["authorization"]}
    return client.get(f"/v1/datasets/{dataset['id']}", headers=headers).json()


def upload(client, data: bytes, filename: str = "data.zip", headers: dict | None = None, **form) -> dict:
    """POST an archive and ingest it; the dataset, ready or failed."""
    files = {"file": (filename, data, "application/octet-stream")}
    return ingest(client, client.post("/v1/datasets", files=files, data=form, headers=headers))


def upload_ready(client, data: bytes, filename: str = "data.zip", headers: dict | None = None, **form) -> dict:
    dataset = upload(client, data, filename, headers, **form)
    assert dataset["status"] == "ready", dataset
    return dataset
