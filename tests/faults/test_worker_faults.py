"""Faults injected into real processes (redis-server, Celery workers, uvicorn; nothing mocked):
workers that vanish, a broker that goes away, a deploy's SIGTERM. Jobs are neither lost nor stuck,
and none makes a second model. Each test is bounded in time and stops by itself."""

import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.archives import zip_tree
from tests.conftest import HYMENOPTERA, Process, Stack, free_port, wait_until

pytestmark = pytest.mark.e2e

LEASE, SWEEP = 10, 1  # seconds: short, so that the bounds below are short too
FAST_SWEEP = {"VISIONTUNE_JOB_LEASE_SECONDS": str(LEASE), "VISIONTUNE_SWEEP_INTERVAL_SECONDS": str(SWEEP)}


class RedisServer:
    """A redis-server with an append-only file, which can be killed and started again on its port."""

    def __init__(self, directory: Path):
        self.port, self.directory = free_port(), directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: Process | None = None

    def start(self) -> None:
        argv = [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)]  # fmt: skip
        self.process = Process(f"redis-{time.monotonic_ns()}", argv, dict(os.environ), self.directory)
        client = redis.Redis(port=self.port)
        wait_until(lambda: _pings(client), 20, "redis-server", processes=[self.process])

    def kill(self) -> None:
        self.process.kill_group()


def _pings(client) -> bool:
    try:
        return client.ping()
    except redis.RedisError:
        return False


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test's own, killed at the end whatever happens (requested before
    `make_stack`, so that the service stops first)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def make_stack(tmp_path):
    stacks = []

    def make(broker_url: str | None, **env) -> Stack:
        stack = Stack(tmp_path / "var", broker_url, tmp_path, {**FAST_SWEEP, **env})
        stacks.append(stack)
        stack.start_api()
        stack.start_worker("background", background=True)  # ingests uploads; the faults hit training workers
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def upload_small(stack: Stack, tmp_path: Path) -> str:
    archive = zip_tree(HYMENOPTERA, tmp_path / "small.zip", per_class={"train": 12, "val": 8})
    return stack.upload(archive)["id"]


def create_job(stack: Stack, dataset_id: str, **fields) -> dict:
    body = {"dataset_id": dataset_id, "backbone": "mobilenetv2_100", "strategy": "full",
            "hyperparameters": {"epochs": 6, "batch_size": 8}, **fields}  # fmt: skip
    response = stack.http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def job(stack: Stack, job_id: str) -> dict:
    return stack.http.get(f"/v1/jobs/{job_id}").json()


def past_first_epoch(stack: Stack, job_id: str) -> dict:
    """The job, once it has finished its first epoch (so a checkpoint exists) and is still running."""
    running = wait_until(lambda: (j := job(stack, job_id))["progress"]["epoch"] >= 1 and j, 300, "the first epoch",
                         interval=0.2, processes=stack.processes)  # fmt: skip
    assert running["status"] == "running" and running["progress"]["epoch"] < running["progress"]["epochs"], running
    return running


def holding_worker(workers: list[Process], holder: str) -> Process:
    """The worker whose pool process is the job's holder ("host:pid")."""
    pid = int(holder.rpartition(":")[2])
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return next(worker for worker in workers if worker.popen.pid == parent)


def models_of(stack: Stack, job_id: str) -> list[dict]:
    return [m for m in stack.http.get("/v1/models").json()["data"] if m["job_id"] == job_id]


def resumed_within(stack: Stack, job_id: str, since: float, seconds: float) -> dict:
    """Wait for the job to finish; assert it was resumed elsewhere within `seconds` of `since`."""
    resumed_at = wait_until(lambda: job(stack, job_id)["attempts"] >= 2 and time.monotonic(), seconds,
                            "the job to be resumed by another worker", interval=0.2)  # fmt: skip
    final = stack.wait_job(job_id, timeout=600)
    assert final["status"] == "succeeded", final
    assert resumed_at - since <= seconds
    return final


# Redis with SQLite adds nothing the two cover (the Redis path is the same), and the suite has a time budget.
@pytest.mark.parametrize("broker", ["embedded", "redis+postgresql"])
def test_a_worker_that_vanishes_mid_epoch_is_replaced_within_the_lease(redis_server, make_stack, tmp_path, broker,
                                                                      request):  # fmt: skip
    """SIGKILL the whole worker (Celery's main process, its pool process and its data loaders), as
    when a machine is lost. On Redis a second worker stands idle; the embedded broker never hands
    out a taken message again, and a worker is started after the loss. The job's claim, heartbeats
    and takeover run on SQLite, or on a real PostgreSQL server."""
    server = redis_server if broker.startswith("redis") else None
    database = {"VISIONTUNE_DATABASE_URL": request.getfixturevalue("postgres_database")} if "postgresql" in broker else {}
    stack = make_stack(server.url if server else None, **database)
    workers = [stack.start_worker("worker-a")]
    if server:
        workers.append(stack.start_worker("worker-b"))
    created = create_job(stack, upload_small(stack, tmp_path))
    running = past_first_epoch(stack, created["id"])
    holder = holding_worker(workers, running["worker"])
    holder.kill_group()
    killed_at = time.monotonic()
    stack.processes.remove(holder)  # gone for good: the waits below watch the others
    holder.stop()
    if not server:
        stack.start_worker("worker-b")  # a worker comes back (a new machine, or the same one restarted)

    final = resumed_within(stack, created["id"], killed_at, LEASE + SWEEP + 30)
    assert final["attempts"] == 2 and final["worker"] != running["worker"]
    events = stack.http.get(f"/v1/jobs/{created['id']}/events").json()["data"]
    assert any(e["message"].startswith("resumed") for e in events)  # from its checkpoint
    assert [m["id"] for m in models_of(stack, created["id"])] == [final["model_id"]]


def test_redis_killed_and_restarted_mid_job(redis_server, make_stack, tmp_path):
    server = redis_server
    stack = make_stack(server.url)
    stack.start_worker()
    created = create_job(stack, upload_small(stack, tmp_path), hyperparameters={"epochs": 4, "batch_size": 8})
    past_first_epoch(stack, created["id"])
    server.kill()
    time.sleep(2)
    server.start()  # same port, its append-only file
    final = stack.wait_job(created["id"], timeout=600)
    assert final["status"] == "succeeded", final
    assert [m["id"] for m in models_of(stack, created["id"])] == [final["model_id"]]


def test_jobs_created_while_the_broker_is_down_run_once_it_is_back(redis_server, make_stack, tmp_path):
    server = redis_server
    stack = make_stack(server.url)
    stack.start_worker()
    dataset_id = upload_small(stack, tmp_path)
    server.kill()

    created = []
    for seed in range(5):
        response = stack.http.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100",
                                                     "strategy": "linear_probe", "seed": seed,
                                                     "hyperparameters": {"epochs": 2}})  # fmt: skip
        assert response.status_code == 202, response.text  # accepted: the row is the truth
        created.append(response.json()["id"])
    assert {job(stack, job_id)["status"] for job_id in created} == {"queued"}

    server.start()
    finals = [stack.wait_job(job_id, timeout=600) for job_id in created]
    assert [f["status"] for f in finals] == ["succeeded"] * 5, finals
    assert [f["attempts"] for f in finals] == [1] * 5  # each ran once
    assert sorted(m["job_id"] for m in stack.http.get("/v1/models").json()["data"]) == sorted(created)


def test_sigterm_releases_the_job_to_another_worker_at_once(redis_server, make_stack, tmp_path):
    """A deploy stops a worker with SIGTERM: its warm shutdown hands the job back, and another
    worker resumes it from the checkpoint at once, not after the lease (long here on purpose)."""
    server = redis_server
    stack = make_stack(server.url, VISIONTUNE_JOB_LEASE_SECONDS="600")
    workers = [stack.start_worker("worker-a"), stack.start_worker("worker-b")]
    created = create_job(stack, upload_small(stack, tmp_path))
    running = past_first_epoch(stack, created["id"])
    holder = holding_worker(workers, running["worker"])
    holder.popen.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    stack.processes.remove(holder)  # it is meant to exit: the waits below watch the others

    final = resumed_within(stack, created["id"], stopped_at, 60)  # far below the 600 s lease
    assert final["attempts"] == 2 and final["worker"] != running["worker"]
    assert holder.popen.wait(timeout=120) == 0  # the stopped worker ended by itself, warm
    holder.stop()
    events = stack.http.get(f"/v1/jobs/{created['id']}/events").json()["data"]
    assert any(e["message"].startswith("released by a worker shutting down") for e in events)
    assert [m["id"] for m in models_of(stack, created["id"])] == [final["model_id"]]


def test_pause_frees_the_worker_and_resume_ends_where_an_uninterrupted_run_would(make_stack, tmp_path):
    stack = make_stack(None)
    stack.start_worker()
    dataset_id = upload_small(stack, tmp_path)
    fields = {"strategy": "partial", "hyperparameters": {"epochs": 4, "batch_size": 8}, "seed": 7}
    paused_job = create_job(stack, dataset_id, **fields)
    past_first_epoch(stack, paused_job["id"])
    paused = stack.http.post(f"/v1/jobs/{paused_job['id']}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused", paused.text
    assert stack.http.post(f"/v1/jobs/{paused_job['id']}/pause").status_code == 409
    # The worker lets go (its training stops at the next heartbeat) and is free for other work.
    wait_until(lambda: any(e["type"] == "worker_stopped" for e in
                           stack.http.get(f"/v1/jobs/{paused_job['id']}/events").json()["data"]),
               60, "the worker to stop", processes=stack.processes)  # fmt: skip
    other = create_job(stack, dataset_id, **fields)  # the same job, run without a pause
    uninterrupted = stack.wait_job(other["id"], timeout=600)
    assert job(stack, paused_job["id"])["status"] == "paused"

    resumed = stack.http.post(f"/v1/jobs/{paused_job['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued", resumed.text
    final = stack.wait_job(paused_job["id"], timeout=600)
    assert final["status"] == "succeeded", final
    paused_model = stack.http.get(f"/v1/models/{final['model_id']}").json()
    straight_model = stack.http.get(f"/v1/models/{uninterrupted['model_id']}").json()
    assert paused_model["metrics"]["val_accuracy"] == straight_model["metrics"]["val_accuracy"]
    assert paused_model["metrics"]["val_loss"] == pytest.approx(straight_model["metrics"]["val_loss"], abs=1e-6)


def test_the_api_killed_and_restarted_mid_job(make_stack, tmp_path):
    """SIGKILL the API (its whole process group) while a job trains, and start it again: the job
    goes on, its events keep coming, and the model it makes answers predictions."""
    stack = make_stack(None)
    stack.start_worker()
    created = create_job(stack, upload_small(stack, tmp_path), hyperparameters={"epochs": 4, "batch_size": 8})
    past_first_epoch(stack, created["id"])
    seen = stack.http.get(f"/v1/jobs/{created['id']}/events").json()["data"][-1]["id"]
    api = next(process for process in stack.processes if process.name == "api")
    api.kill_group()
    stack.processes.remove(api)
    api.stop()
    with pytest.raises(httpx.TransportError):
        stack.http.get("/healthz")
    time.sleep(2)
    stack.start_api()  # same data directory and port

    final = stack.wait_job(created["id"], timeout=600)
    assert final["status"] == "succeeded" and final["attempts"] == 1, final  # the worker never noticed
    later = stack.http.get(f"/v1/jobs/{created['id']}/events", params={"after": seen}).json()["data"]
    assert [e["type"] for e in later].count("epoch") >= 1 and later[-1]["message"].startswith("succeeded")
    image = sorted((HYMENOPTERA / "val" / "bees").iterdir())[0]
    predicted = stack.http.post(f"/v1/models/{final['model_id']}/predict", files={"files": (image.name, image.read_bytes())})
    assert predicted.status_code == 200 and predicted.json()["predictions"][0]["labels"], predicted.text
