"""A bounded chaos run: mixed uploads, jobs, predictions, alias moves, deletes, exports, pauses and
cancels against the real service (uvicorn API, two training workers, a background worker for
ingests and exports, redis-server with an append-only file), while a chaos thread SIGKILLs and
restarts a random one of those processes. Then the service is left to settle and the invariants
are checked straight on the database and the data directory:

- every job is finished, every dataset ready or failed, every export ready or failed (none left
  waiting or held);
- every succeeded job has exactly one model, whose artifact exists (or the run deleted that model);
- no file in datasets/, uploads/, models/, exports/, jobs/ or staging/ that no row owns (once the
  sweeper's orphan age has passed), and no row whose files are missing.

    python bench/chaos.py [--seconds 120] [--seed 0]

Prints the counts: operations by kind and answer, kills by process, invariant violations (0).
Exits 1 if any invariant is violated.
"""

import argparse
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.handwritten import HYMENOPTERA, SHARED  # noqa: E402
from bench.running import free_port, zip_hymenoptera  # noqa: E402

LEASE, SWEEP, ORPHAN_AGE, REDISPATCH = 8, 1, 20, 20  # seconds: short, so that the service settles soon
# At most this many queued, running or paused jobs, and ingests under way, at once: the run stays about
# faults, and the backlog left to settle stays short (else uploads pile up while the background worker is down).
MAX_ACTIVE_JOBS, MAX_INGESTS = 4, 2
IMAGES = [p.read_bytes() for label in ("ants", "bees") for p in sorted((HYMENOPTERA / "val" / label).iterdir())[:6]]


class Service:
    """redis-server, the API and two workers, each in a process group of its own."""

    def __init__(self, root: Path):
        self.root, self.port, self.redis_port = root, free_port(), free_port()
        self.env = {**os.environ, "VISIONTUNE_DATA_DIR": str(root / "var"), "PYTHONUNBUFFERED": "1",
                    "VISIONTUNE_WEIGHTS_DIR": str(SHARED / "weights"),
                    "VISIONTUNE_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                    "VISIONTUNE_JOB_LEASE_SECONDS": str(LEASE), "VISIONTUNE_SWEEP_INTERVAL_SECONDS": str(SWEEP),
                    "VISIONTUNE_ORPHAN_MAX_AGE_SECONDS": str(ORPHAN_AGE), "VISIONTUNE_PREDICT_TIMEOUT_S": "30",
                    "VISIONTUNE_REDISPATCH_SECONDS": str(REDISPATCH),
                    "HF_HUB_OFFLINE": "1"}  # fmt: skip
        cli = [sys.executable, "-m", "app.cli"]
        self.argv = {
            "redis": [shutil.which("redis-server"), "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "yes", "--dir", str(root)],
            "api": [*cli, "serve", "--port", str(self.port)],
            "worker-a": [*cli, "worker"],
            "worker-b": [*cli, "worker"],
            "background": [*cli, "worker", "--background"],
        }  # fmt: skip
        self.processes: dict[str, subprocess.Popen] = {}
        self.last_kill = time.monotonic()
        key = subprocess.run([*cli, "keys", "create", "--tenant", "chaos", "--operator"], env=self.env, check=True,
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
        self.headers = {"Authorization": f"Bearer {key}"}

    def start(self, name: str) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(self.argv[name], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)  # fmt: skip

    def kill(self, name: str) -> None:
        try:
            os.killpg(self.processes[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.processes[name].wait()
        self.last_kill = time.monotonic()

    def stop(self) -> None:
        for name in self.processes:
            self.kill(name)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120, help="how long operations and kills go on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive = zip_hymenoptera(root / "small.zip", per_class=8)
        service = Service(root)
        for name in service.argv:
            service.start(name)
        http = httpx.Client(base_url=service.url(), headers=service.headers, timeout=120)
        wait_ready(http)
        operations, kills, deleted_models = Counter(), Counter(), set()
        stop = threading.Event()
        chaos = threading.Thread(target=kill_and_restart, args=(service, rng, stop, kills))
        chaos.start()
        try:
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                operate(http, rng, archive, operations, deleted_models)
        finally:
            stop.set()
            chaos.join()
        try:
            violations = settle_and_check(service, http, deleted_models)
            outcomes = Counter(job["status"] for job in http.get("/v1/jobs", params={"limit": 1000}).json()["data"])
        finally:
            http.close()
            service.stop()

    print(f"chaos run: {args.seconds:g} s of operations, seed {args.seed}")
    print(f"operations: {sum(operations.values())}  " + ", ".join(f"{k} {v}" for k, v in sorted(operations.items())))
    print(f"kills: {sum(kills.values())}  " + ", ".join(f"{k} {v}" for k, v in sorted(kills.items())))
    print("jobs at the end: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(f"invariant violations: {len(violations)}")
    for violation in violations:
        print(f"  - {violation}")
    sys.exit(1 if violations else 0)


def wait_ready(http: httpx.Client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    sys.exit("the service did not become ready")


def kill_and_restart(service: Service, rng: random.Random, stop: threading.Event, kills: Counter) -> None:
    while not stop.wait(rng.uniform(6, 14)):
        name = rng.choice(list(service.argv))
        service.kill(name)
        kills[name] += 1
        time.sleep(rng.uniform(0.5, 3))
        service.start(name)


def operate(http: httpx.Client, rng: random.Random, archive: Path, operations: Counter, deleted: set) -> None:
    """One random operation; its answer (or the transport failure while a process was down) is counted."""
    try:
        listed = http.get("/v1/datasets").json()["data"]
        jobs = http.get("/v1/jobs").json()["data"]
        models = http.get("/v1/models").json()["data"]
    except (httpx.TransportError, ValueError):
        operations["unavailable"] += 1
        time.sleep(0.5)
        return
    kind = rng.choices(
        ["upload", "train", "predict", "alias", "delete_model", "export", "pause", "resume", "cancel", "delete_dataset"],
        weights=[1, 4, 8, 2, 1, 1, 0.3, 0.3, 0.3, 0.5],  # few pauses and cancels: jobs must finish to make models
    )[0]
    if kind == "train" and sum(job["status"] in ("queued", "running", "paused") for job in jobs) >= MAX_ACTIVE_JOBS:
        kind = "predict"
    datasets = [d["id"] for d in listed if d["status"] == "ready"]
    ingesting = sum(d["status"] == "processing" for d in listed)
    if not datasets and ingesting:
        time.sleep(0.2)  # the first ingest is under way
        return
    if kind == "upload" and ingesting >= MAX_INGESTS:
        kind = "predict"
    try:
        if kind == "upload" or not datasets:
            kind = "upload"
            response = http.post("/v1/datasets", files={"file": (archive.name, archive.read_bytes())})
        elif kind == "train":
            strategy = rng.choice(["linear_probe", "linear_probe", "partial"])
            response = http.post("/v1/jobs", json={"dataset_id": rng.choice(datasets), "backbone": "mobilenetv2_100",
                                                   "strategy": strategy, "model_name": rng.choice(["ants", "bees"]),
                                                   "seed": rng.randrange(1000),
                                                   "hyperparameters": {"epochs": 2, "batch_size": 8}})  # fmt: skip
        elif kind in ("predict", "alias", "delete_model", "export") and models:
            model = rng.choice(models)
            if kind == "predict":
                response = http.post(f"/v1/models/{model['id']}/predict", files={"files": ("x.jpg", rng.choice(IMAGES))})
            elif kind == "alias":
                response = http.put(f"/v1/models/{model['name']}/aliases/production", json={"version": model["version"]})
            elif kind == "delete_model":
                response = http.delete(f"/v1/models/{model['id']}")
                if response.status_code == 204:
                    deleted.add(model["id"])
            else:
                response = http.post(f"/v1/models/{model['id']}/exports", json={"format": "onnx"})
        elif kind in ("pause", "resume", "cancel") and jobs:
            response = http.post(f"/v1/jobs/{rng.choice(jobs)['id']}/{kind}")
        elif kind == "delete_dataset":
            response = http.delete(f"/v1/datasets/{rng.choice(datasets)}")
        else:
            return
        operations[f"{kind} {response.status_code}"] += 1
    except httpx.TransportError:
        operations[f"{kind} unavailable"] += 1
        time.sleep(0.5)


def settle_and_check(service: Service, http: httpx.Client, deleted_models: set) -> list[str]:
    for name, process in service.processes.items():
        if process.poll() is not None:
            service.start(name)
    wait_ready(http)
    for job in http.get("/v1/jobs", params={"limit": 1000}).json()["data"]:
        if job["status"] == "paused":
            http.post(f"/v1/jobs/{job['id']}/resume")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        jobs = http.get("/v1/jobs", params={"limit": 1000}).json()["data"]
        datasets = http.get("/v1/datasets", params={"limit": 1000}).json()["data"]
        exports = [http.get(f"/v1/models/{m['id']}/exports/onnx").json().get("status")
                   for m in http.get("/v1/models", params={"limit": 1000}).json()["data"]]  # fmt: skip
        if (all(job["status"] in ("succeeded", "failed", "cancelled") for job in jobs)
                and "processing" not in [d["status"] for d in datasets] + exports):  # fmt: skip
            break
        time.sleep(2)
    # Only a kill leaves files that no row owns, and the sweeper collects them once they are ORPHAN_AGE old.
    time.sleep(max(0.0, service.last_kill + ORPHAN_AGE + 3 * SWEEP - time.monotonic()))
    return check(service.root / "var", deleted_models)


def check(data_dir: Path, deleted_models: set) -> list[str]:
    """The invariants, read from the database and the files themselves."""
    violations = []
    db = sqlite3.connect(data_dir / "visiontune.db")
    jobs = db.execute("SELECT id, status FROM jobs").fetchall()
    models = dict(db.execute("SELECT id, job_id FROM models").fetchall())
    datasets = dict(db.execute("SELECT id, status FROM datasets").fetchall())
    content = dict(db.execute("SELECT id, content_key FROM datasets WHERE status = 'ready'").fetchall())
    exports = dict(db.execute("SELECT model_id, status FROM exports").fetchall())
    events = dict(db.execute(
        "SELECT job_id, json_extract(data, '$.model_id') FROM job_events WHERE json_extract(data, '$.model_id') IS NOT NULL"
    ).fetchall())  # fmt: skip
    db.close()
    per_job = Counter(models.values())
    for job_id, status in jobs:
        if status not in ("succeeded", "failed", "cancelled"):
            violations.append(f"job {job_id} is still {status}")
        if status == "succeeded" and per_job[job_id] != 1 and events.get(job_id) not in deleted_models:
            violations.append(f"succeeded job {job_id} has {per_job[job_id]} models")
        if per_job[job_id] > 1:
            violations.append(f"job {job_id} has {per_job[job_id]} models")
    for model_id in models:
        if not (data_dir / "models" / model_id / "model.safetensors").exists():
            violations.append(f"model {model_id} has no artifact")
    for dataset_id, status in datasets.items():
        if status not in ("ready", "failed"):
            violations.append(f"dataset {dataset_id} is still {status}")
        if status == "ready" and not (data_dir / content[dataset_id]).is_dir():
            violations.append(f"dataset {dataset_id} has no files")
    for model_id, status in exports.items():
        if status not in ("ready", "failed"):
            violations.append(f"the export of {model_id} is still {status}")
        if status == "ready" and not (data_dir / "exports" / model_id / "model.onnx").exists():
            violations.append(f"the export of {model_id} has no file")
    ready = {key.removeprefix("datasets/") for key in content.values()}  # datasets/<sha256>, shared by equal uploads
    exported = {model_id for model_id, status in exports.items() if status == "ready"}
    owners = {"datasets": ready, "uploads": set(), "models": set(models), "exports": exported, "jobs": set(),
              "staging": set()}  # fmt: skip
    for folder, owned in owners.items():
        directory = data_dir / folder
        for entry in directory.iterdir() if directory.is_dir() else []:
            if entry.name not in owned:
                violations.append(f"{folder}/{entry.name} belongs to no row")
    return violations


if __name__ == "__main__":
    main()
