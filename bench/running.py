"""Running the real service for benchmarks: `visiontune up` or `serve` on a free port."""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.handwritten import HYMENOPTERA, SHARED


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, and of its running children (the API
    processes of `VISIONTUNE_API_WORKERS` > 1)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(cpu_seconds(int(c)) for c in children)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def running(command: str, data_dir: Path, environment: dict[str, str] | None = None,
            **settings: str) -> Iterator[tuple[subprocess.Popen, httpx.Client]]:  # fmt: skip
    """`visiontune <command>` with VISIONTUNE_<NAME> settings (and other `environment` variables,
    such as AWS_*); yields once /readyz answers."""
    port = free_port()
    env = {**os.environ, "VISIONTUNE_DATA_DIR": str(data_dir), "VISIONTUNE_WEIGHTS_DIR": str(SHARED / "weights"),
           **(environment or {})}  # fmt: skip
    env.update({f"VISIONTUNE_{name.upper()}": value for name, value in settings.items()})
    log_path = data_dir.parent / f"{command}-{port}.log"
    keys = [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "bench", "--scopes", "admin"]
    key = subprocess.run(keys, env=env, check=True, capture_output=True, text=True).stdout.strip()
    with log_path.open("wb") as log:
        service = subprocess.Popen([sys.executable, "-m", "app.cli", command, "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, headers={"Authorization": f"Bearer {key}"})
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or service.poll() is not None:
                    sys.exit("service did not start:\n" + log_path.read_text())
                time.sleep(0.5)
            if command == "up":  # both workers (training and background) listening, not still starting
                while log_path.read_text(errors="replace").count(" ready.") < 2:
                    if time.monotonic() > deadline or service.poll() is not None:
                        sys.exit("workers did not start:\n" + log_path.read_text())
                    time.sleep(0.2)
            _wait_until_quiet(service.pid, deadline)
            yield service, http
        finally:
            http.close()
            service.terminate()
            service.wait(timeout=60)


def _wait_until_quiet(pid: int, deadline: float, busy: float = 0.1) -> None:
    """Until the service's processes (sweepers and API included) have finished starting: less than
    `busy` CPU seconds in a second. Start-up is not what a bench measures."""
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(1.0)
        if cpu_seconds(pid) - before < busy:
            return


@contextmanager
def distributed_backends(root: Path) -> Iterator[dict[str, str]]:
    """A PostgreSQL server, a redis-server and moto's S3 server on 127.0.0.1, as a deployment on
    several machines would use them; yields the environment that points VisionTune at them."""
    import boto3
    import psycopg

    programs = {name: shutil.which(name) or max(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), default=None)
                for name in ("initdb", "postgres")}  # fmt: skip
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    pgdata = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    pgdata.chmod(0o777)
    ports = {name: free_port() for name in ("postgres", "redis", "s3")}
    subprocess.run([*as_postgres, programs["initdb"], "-D", str(pgdata / "data"), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)  # fmt: skip
    servers = [
        subprocess.Popen([*as_postgres, programs["postgres"], "-D", str(pgdata / "data"), "-p", str(ports["postgres"]),
                          "-k", str(pgdata / "data"), "-c", "listen_addresses=127.0.0.1"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True),
        subprocess.Popen([shutil.which("redis-server"), "--port", str(ports["redis"]), "--bind", "127.0.0.1",
                          "--save", ""], stdout=subprocess.DEVNULL, start_new_session=True),
        subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                          str(ports["s3"])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True),
    ]  # fmt: skip
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(f"postgresql://postgres@127.0.0.1:{ports['postgres']}/postgres").close()
                boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name="us-east-1",
                             aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket="bench")  # fmt: skip
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield {**aws, "VISIONTUNE_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{ports['postgres']}/postgres",
               "VISIONTUNE_BROKER_URL": f"redis://127.0.0.1:{ports['redis']}/0",
               "VISIONTUNE_STORAGE_URL": "s3://bench/visiontune"}  # fmt: skip
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(pgdata, ignore_errors=True)


def zip_hymenoptera(archive: Path, per_class: int | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as out:
        for class_dir in sorted(p for p in HYMENOPTERA.glob("*/*") if p.is_dir()):
            for path in sorted(class_dir.iterdir())[:per_class]:
                out.write(path, arcname=f"hymenoptera/{path.relative_to(HYMENOPTERA)}")
    return archive


def wait_for_dataset(http: httpx.Client, dataset: dict, poll: float = 0.2) -> dict:
    while dataset["status"] == "processing":
        time.sleep(poll)
        dataset = http.get(f"/v1/datasets/{dataset['id']}").json()
    if dataset["status"] != "ready":
        sys.exit(f"dataset {dataset['status']}: {dataset['error']}")
    return dataset


def wait_for_job(http: httpx.Client, job: dict, poll: float = 0.2) -> dict:
    while job["status"] in ("queued", "running"):
        time.sleep(poll)
        job = http.get(f"/v1/jobs/{job['id']}").json()
    if job["status"] != "succeeded":
        sys.exit(f"job {job['status']}: {job['error']}")
    return job
