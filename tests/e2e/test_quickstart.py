"""README's quickstart, run as written against `visiontune up` on embedded defaults: the SQLite
database and kombu's SQLAlchemy broker, no Redis."""

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import HYMENOPTERA, REPO, SHARED, WEIGHTS_DIR, Process, empty_hub_env, free_port, wait_until

pytestmark = pytest.mark.e2e


def quickstart_block(name: str) -> str:
    """The README block under `<!-- quickstart-NAME: ... -->`."""
    readme = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- quickstart-{name}:.*?-->\s*```\w+\n(.*?)```", readme, re.S)
    assert match, f"README.md has no quickstart-{name} block"
    return match.group(1)


@pytest.fixture(scope="module")
def embedded_service(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISIONTUNE_")}
    env.update(VISIONTUNE_DATA_DIR=str(root / "var"), VISIONTUNE_WEIGHTS_DIR=str(WEIGHTS_DIR), PYTHONUNBUFFERED="1")
    env.update(empty_hub_env(root))
    visiontune = Path(sys.executable).parent / "visiontune"
    process = Process("up", [str(visiontune), "up", "--port", str(port)], env, root)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=120)

    def ready():
        try:
            return http.get("/readyz").json()["status"] == "ready"
        except (httpx.TransportError, ValueError):
            return False

    wait_until(ready, 90, "visiontune up", processes=[process])
    # Never an open server: `up` printed a first admin key, once; unauthenticated calls are refused.
    keys = re.findall(r"^\s+(vt_[0-9a-f]{8}_[\w-]{43})$", process.tail(200), re.MULTILINE)
    assert len(keys) == 1, process.tail()
    assert http.get("/v1/datasets").status_code == 401
    http.headers["Authorization"] = f"Bearer {keys[0]}"
    yield url, http, root, process
    http.close()
    assert processes_using(root), "the API and worker processes should be running until stopped"
    process.stop()
    assert process.popen.returncode == 0
    wait_until(lambda: not processes_using(root), 60, "`visiontune up` to stop its API and worker")


def processes_using(root: Path) -> list[int]:
    """Processes whose environment names this test's data directory (Linux /proc)."""
    marker = f"VISIONTUNE_DATA_DIR={root / 'var'}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def test_quickstart_as_written_on_embedded_broker(embedded_service):
    """The three ways the README shows, each run as written: the CLI, the Python SDK, curl."""
    url, http, root, process = embedded_service
    key = http.headers["Authorization"].split()[1]
    env = {**os.environ, "SHARED": str(SHARED), "VISIONTUNE_API_URL": url, "VISIONTUNE_API_KEY": key,
           "API": url, "KEY": key}  # fmt: skip
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # as in an activated venv: `visiontune`

    def run(argv: list[str]) -> list[str]:
        done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{process.tail()}"
        return done.stdout.strip().splitlines()

    cli = run(["bash", "-euo", "pipefail", "-c", quickstart_block("cli")])
    assert re.fullmatch(r"job job_\w+: succeeded \(mobilenetv2_100, linear_probe\)", cli[0]), cli
    assert float(next(line.split(": ")[1] for line in cli if line.startswith("  val_accuracy: "))) >= 0.93
    assert cli[-3].split() == ["IMAGE", "RANK", "LABEL", "SCORE"] and cli[-2].split()[1:3] == ["1", "bees"], cli

    status, label = run([sys.executable, "-c", quickstart_block("python")])
    assert status.split()[0] == "succeeded" and float(status.split()[1]) >= 0.93 and label == "bees", status

    curl = run(["bash", "-euo", "pipefail", "-c", quickstart_block("curl")])
    assert re.fullmatch(r"job job_\w+: succeeded", curl[-3]), curl
    assert float(curl[-2]) >= 0.93
    prediction = httpx.Response(200, content=curl[-1]).json()["predictions"][0]
    assert prediction["labels"][0]["label"] == "bees"
    assert (root / "var" / "broker.db").exists(), "the embedded SQLite broker was not used"

    model_id = http.get("/v1/models").json()["data"][0]["id"]
    images = [(p, label) for label in ("ants", "bees") for p in sorted((HYMENOPTERA / "val" / label).iterdir())[10:20]]
    response = http.post(
        f"/v1/models/{model_id}/predict", files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p, _ in images]
    )
    assert response.status_code == 200, response.text
    right = sum(p["labels"][0]["label"] == truth for p, (_, truth) in zip(response.json()["predictions"], images))
    assert right >= 18


def test_workers_run_below_the_api_cpu_priority(embedded_service):
    """On one machine the API's predictions come first: the training worker runs TRAINING_NICE
    below it, the background worker (ingests, exports) BACKGROUND_NICE below, each with its pool
    process and its sweeper."""
    _, _, root, process = embedded_service

    def nice(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])

    def command(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()

    base = nice(process.popen.pid)
    by_role: dict[str, set[int]] = {}
    for pid in processes_using(root):
        argv = command(pid)
        role = ("background" if "ingest," in argv else "training") if ("celery" in argv or "app.sweeper" in argv) else (
            "api" if " serve " in argv else "other")  # fmt: skip
        by_role.setdefault(role, set()).add(nice(pid) - base)
    assert by_role["api"] == {0}, by_role
    assert by_role["training"] == {5}, by_role  # the Celery worker, its pool process and its sweeper
    assert by_role["background"] == {10}, by_role
