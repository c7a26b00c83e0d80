"""Workers on other machines, sharing nothing with the API but URLs: the API and two worker
"hosts" run as separate processes, each with a data directory of its own, against a real
PostgreSQL server, redis-server and an S3 server speaking the real S3 HTTP API (moto's). A worker
killed mid-training is replaced by the other, which resumes from the checkpoint in the object
store; the API then serves the model, though its own disk never held the dataset's images."""

import time
from pathlib import Path

import pytest

from tests.archives import zip_tree
from tests.conftest import HYMENOPTERA, Process, Stack, wait_until

pytestmark = pytest.mark.e2e
LEASE, SWEEP = 10, 1


def holding(workers: list[Process], holder: str) -> Process:
    pid = int(holder.rpartition(":")[2])
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return next(worker for worker in workers if worker.popen.pid == parent)


def test_a_job_moves_between_hosts_through_the_object_store(tmp_path, redis_url, postgres_database, s3_server):
    urls = {
        "VISIONTUNE_DATABASE_URL": postgres_database,
        "VISIONTUNE_STORAGE_URL": f"s3://{s3_server.new_bucket()}/visiontune",
        "VISIONTUNE_JOB_LEASE_SECONDS": str(LEASE), "VISIONTUNE_SWEEP_INTERVAL_SECONDS": str(SWEEP),
        "VISIONTUNE_CHECKPOINT_UPLOAD_SECONDS": "0",  # every epoch's: the kill comes after the first
        **s3_server.env,
    }  # fmt: skip
    broker = redis_url.rsplit("/", 1)[0] + "/7"  # a database of its own on the shared test server
    hosts = {name: Stack(tmp_path / name / "var", broker, tmp_path / name, urls) for name in ("api", "a", "b")}
    for name in ("api", "a", "b"):
        (tmp_path / name).mkdir(exist_ok=True)
    try:
        api = hosts["api"]
        api.start_api()
        workers = [hosts["a"].start_worker("worker-a"), hosts["b"].start_worker("worker-b")]
        hosts["b"].start_worker("background-b", background=True)

        archive = zip_tree(HYMENOPTERA, tmp_path / "small.zip", per_class={"train": 12, "val": 8})
        dataset = api.upload(archive)
        job = api.http.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100",
                                              "strategy": "full", "hyperparameters": {"epochs": 6, "batch_size": 8}}).json()  # fmt: skip
        running = wait_until(lambda: (j := api.http.get(f"/v1/jobs/{job['id']}").json())["progress"]["epoch"] >= 1 and j,
                             600, "the first epoch", interval=0.2, processes=api.processes + workers)  # fmt: skip
        assert running["status"] == "running" and running["progress"]["epoch"] < 6, running
        victim = holding(workers, running["worker"])
        victim.kill_group()
        for stack in hosts.values():
            if victim in stack.processes:
                stack.processes.remove(victim)
        victim.stop()

        final = api.wait_job(job["id"], timeout=600)
        assert final["status"] == "succeeded" and final["attempts"] == 2, final
        models = [m for m in api.http.get("/v1/models").json()["data"] if m["job_id"] == job["id"]]
        assert [m["id"] for m in models] == [final["model_id"]]
        events = api.http.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        resumed = next(i for i, e in enumerate(events) if e["message"].startswith("resumed"))
        first_after = next(e for e in events[resumed:] if e["type"] == "epoch")
        assert first_after["data"]["epoch"] > 1, "the other host started over instead of resuming its checkpoint"

        image = sorted((HYMENOPTERA / "val" / "bees").iterdir())[0]
        predicted = api.http.post(f"/v1/models/{final['model_id']}/predict", files={"files": (image.name, image.read_bytes())})
        assert predicted.status_code == 200 and predicted.json()["predictions"][0]["labels"], predicted.text
        api_disk = [p for p in (tmp_path / "api" / "var").rglob("*.jpg")]
        assert api_disk == [], f"the API's disk held images: {api_disk[:3]}"
    finally:
        for stack in hosts.values():
            stack.stop()
