"""Running the real service for benchmarks: `visiontune up` or `serve` on a free port."""

import os
import socket
import subprocess
import sys
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


@contextmanager
def running(command: str, data_dir: Path, **settings: str) -> Iterator[tuple[subprocess.Popen, httpx.Client]]:
    """`visiontune <command>` with VISIONTUNE_<NAME> settings; yields once /readyz answers."""
    port = free_port()
    env = {**os.environ, "VISIONTUNE_DATA_DIR": str(data_dir), "VISIONTUNE_WEIGHTS_DIR": str(SHARED / "weights")}
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
            if command == "up":
                time.sleep(3)  # let the worker finish connecting
            yield service, http
        finally:
            http.close()
            service.terminate()
            service.wait(timeout=60)


def zip_hymenoptera(archive: Path, per_class: int | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as out:
        for class_dir in sorted(p for p in HYMENOPTERA.glob("*/*") if p.is_dir()):
            for path in sorted(class_dir.iterdir())[:per_class]:
                out.write(path, arcname=f"hymenoptera/{path.relative_to(HYMENOPTERA)}")
    return archive


def wait_for_job(http: httpx.Client, job: dict, poll: float = 0.2) -> dict:
    while job["status"] in ("queued", "running"):
        time.sleep(poll)
        job = http.get(f"/v1/jobs/{job['id']}").json()
    if job["status"] != "succeeded":
        sys.exit(f"job {job['status']}: {job['error']}")
    return job
