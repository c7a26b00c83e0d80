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


def quickstart_script() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- quickstart:.*?-->\s*```bash\n(.*?)```", readme, re.S)
    assert match, "README.md has no quickstart block"
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
    url, http, root, process = embedded_service
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", quickstart_script()],
        cwd=root, env={**os.environ, "API": url, "SHARED": str(SHARED), "KEY": http.headers["Authorization"].split()[1]},
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{process.tail()}"
    assert (root / "var" / "broker.db").exists(), "the embedded SQLite broker was not used"

    lines = run.stdout.strip().splitlines()
    assert re.fullmatch(r"job job_\w+: succeeded", lines[-3]), run.stdout
    assert float(lines[-2]) >= 0.93
    prediction = httpx.Response(200, content=lines[-1]).json()["predictions"][0]
    assert prediction["labels"][0]["label"] == "bees"

    model_id = http.get("/v1/models").json()["data"][0]["id"]
    images = [(p, label) for label in ("ants", "bees") for p in sorted((HYMENOPTERA / "val" / label).iterdir())[10:20]]
    response = http.post(
        f"/v1/models/{model_id}/predict", files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p, _ in images]
    )
    assert response.status_code == 200, response.text
    right = sum(p["labels"][0]["label"] == truth for p, (_, truth) in zip(response.json()["predictions"], images))
    assert right >= 18
