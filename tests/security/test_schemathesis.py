"""Schemathesis against the API's own OpenAPI document, over real HTTP to a uvicorn process, with a
valid admin key: every phase (examples, coverage, fuzzing, stateful with the links it infers) and
every check but two (see CHECKS). It must find no 5xx and no response the schema does not describe.

The server holds real objects first (a dataset of hymenoptera photos, a model trained by the
worker's own code, an alias, an ONNX export, a queued job, a sweep, a second tenant and key), and
schemathesis is given their ids beside the ones it generates, so that its requests reach past the
404 of an unknown id into each endpoint's own logic.
"""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from app.core.config import get_settings
from app.jobs.runner import run_job
from app.models.runner import run_export
from app.webhooks.runner import run_delivery
from tests.conftest import WEIGHTS_DIR, Process, free_port, is_ready, wait_until
from tests.tenants.test_tenancy import new_tenant, upload

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MAX_EXAMPLES = 100  # per operation and phase (schemathesis's default)
# Read-only listings whose only inputs are an id and paging: fewer cases each (the suite's time).
FEWER_EXAMPLES = {"GET /v1/datasets/{dataset_id}/images": 25, "GET /v1/models/{model_id}/validation-predictions": 25}
SEED = 20261122  # a fixed seed: CI runs the same cases every time, and a failure can be replayed

# Every check schemathesis enables by default, which is every check but two:
# - `positive_data_acceptance` expects every schema-valid body to be accepted. A JSON schema cannot
#   say everything the API checks (warmup_epochs < epochs, a backbone name that timm knows, a dataset
#   of this tenant), so those refusals are correct 422s and 404s. Excluded here.
# - `max_response_time` (ST112) fails any response slower than 10 s. It is off unless asked for,
#   and `--checks all` asks for it (schemathesis 4.x; its `--exclude-checks` does not accept the
#   name), hence no `--checks all`. A wall-clock limit measures the machine, not the API: on a clean
#   clone the ONNX export, then made inside its request, took 11.8 s and failed the run (it is a job now).
#   Slowness that matters is bench/'s business; this test is about errors and the schema.
CHECKS = ["--exclude-checks", "positive_data_acceptance"]


def train(client, dataset_id: str) -> str:
    job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100",
                                        "strategy": "linear_probe", "model_name": "pets"}).json()  # fmt: skip
    run_job(job["id"])  # the worker's own code, in this process
    model_id = client.get(f"/v1/jobs/{job['id']}").json()["model_id"]
    assert model_id, "the seed model did not train"
    return model_id


def seed_objects(client, archive: Path) -> tuple[dict[str, list], dict[str, list]]:
    """Objects of every kind, made through the API: the ids for every operation, and those of some
    operations: separate ones for the DELETE operations (so that the first successful delete leaves
    the others something), and the ids a few others reach their logic with."""
    dataset, spare_dataset = (upload(client, {}, archive)["id"] for _ in range(2))
    model_id, spare_model_id = train(client, dataset), train(client, dataset)  # pets@1 and pets@2
    assert client.put("/v1/models/pets/aliases/production", json={"version": 1}).status_code == 200
    assert client.put("/v1/models/pets/aliases/staging", json={"version": 2}).status_code == 200
    export = client.post(f"/v1/models/{model_id}/exports", json={"format": "onnx"})
    assert export.status_code == 202 and run_export(export.json()["id"]) == "ready"
    queued = client.post("/v1/jobs", json={"dataset_id": dataset, "backbone": "mobilenetv2_100"}).json()
    sweep = client.post("/v1/sweeps", json={"dataset_id": dataset, "backbones": ["mobilenetv2_100"]}).json()
    webhook, spare_webhook = (client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": events}).json()
                              for events in (["job.cancelled"], ["dataset.ready"]))  # fmt: skip
    cancelled = client.post("/v1/jobs", json={"dataset_id": dataset, "backbone": "mobilenetv2_100"}).json()
    client.post(f"/v1/jobs/{cancelled['id']}/cancel")  # a delivery to the webhook, failed: nothing listens on port 9
    [delivery] = client.get(f"/v1/webhooks/{webhook['id']}/deliveries").json()["data"]
    assert run_delivery(delivery["id"]) == "failed"  # so that it can be resent (once: then it is pending)
    other, _ = new_tenant(client, "other", scopes=("read",))
    other_keys = [k["id"] for k in client.get(f"/v1/admin/tenants/{other['id']}/keys").json()["data"]]
    me = client.get("/v1/me").json()
    everywhere = {
        "dataset_id": [dataset],
        "job_id": [client.get(f"/v1/models/{model_id}").json()["job_id"], queued["id"]],
        "sweep_id": [sweep["id"]],
        "model_id": [model_id, "pets@1", "pets@production"],
        "name": ["pets"],
        "alias": ["production", "staging"],
        "tenant_id": [me["tenant"]["id"], other["id"]],
        "key_id": [*other_keys, me["key"]["id"]],  # revoking its own key is refused (409)
        "webhook_id": [webhook["id"]],
        "delivery_id": [delivery["id"]],
    }
    per_operation = {
        "DELETE /v1/datasets/{dataset_id}": {"dataset_id": [spare_dataset]},
        "DELETE /v1/models/{model_id}": {"model_id": [spare_model_id, "pets@2"]},
        "DELETE /v1/models/{name}/aliases/{alias}": {"alias": ["staging"]},
        "DELETE /v1/webhooks/{webhook_id}": {"webhook_id": [spare_webhook["id"]]},
        # Two ids that must match each other: given 9 times in 10.
        "POST /v1/webhooks/{webhook_id}/deliveries/{delivery_id}/resend": {"webhook_id": [webhook["id"]],
                                                                            "delivery_id": [delivery["id"]]},
    }
    return everywhere, per_operation


def config(everywhere: dict[str, list], per_operation: dict[str, dict[str, list]]) -> str:
    """schemathesis.toml: each id list is a dictionary, used for half the values of the parameters
    of that name (in paths, and in bodies for dataset_id)."""
    lines = []
    for name, values in everywhere.items():
        lines += [f"[dictionaries.{name}]", f"values = {json.dumps(values)}"]
    for operation, params in per_operation.items():
        for name, values in params.items():
            lines += [f"[dictionaries.{_key(operation, name)}]", f"values = {json.dumps(values)}"]
    lines.append("[parameters]")
    lines += [f'"path.{name}" = {{ dictionary = "{name}", probability = 0.5 }}' for name in everywhere]
    lines.append('"body.dataset_id" = { dictionary = "dataset_id", probability = 0.5 }')
    for operation, params in per_operation.items():
        lines += ["[[operations]]", f'include-name = "{operation}"', "[operations.parameters]"]
        lines += [f'"path.{n}" = {{ dictionary = "{_key(operation, n)}", probability = {_probability(operation)} }}'
                  for n in params]
    for operation, examples in FEWER_EXAMPLES.items():
        lines += ["[[operations]]", f'include-name = "{operation}"', "[operations.generation]", f"max-examples = {examples}"]
    return "\n".join(lines) + "\n"


def _probability(operation: str) -> float:
    return 0.5 if operation.startswith("DELETE") else 0.9


def _key(operation: str, name: str) -> str:
    return re.sub(r"\W+", "_", f"{operation}_{name}").strip("_").lower()


@pytest.mark.e2e  # a uvicorn subprocess, and the schemathesis CLI against it
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    client, settings_env, small_hymenoptera_zip, tmp_path, monkeypatch
):
    # Webhooks to 127.0.0.1 may be registered (no worker sends them here); event streams of the
    # queued job last a second (a stream otherwise lasts until its job ends, which this one never does).
    server_env = {"VISIONTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "true", "VISIONTUNE_SSE_MAX_SECONDS": "1",
                  "VISIONTUNE_WEBHOOK_MAX_ATTEMPTS": "1"}  # fmt: skip
    for name, value in server_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    ids, per_operation = seed_objects(client, small_hymenoptera_zip)
    env = {**os.environ, "VISIONTUNE_DATA_DIR": str(settings_env), "VISIONTUNE_WEIGHTS_DIR": str(WEIGHTS_DIR),
           "PYTHONUNBUFFERED": "1", **server_env}  # fmt: skip
    port = free_port()
    api = Process("api", [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env, tmp_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            wait_until(lambda: is_ready(http), 60, "the API", processes=[api])
        (tmp_path / "schemathesis.toml").write_text(config(ids, per_operation))
        report = tmp_path / "report.json"
        argv = [
            str(SCHEMATHESIS), "--config-file", str(tmp_path / "schemathesis.toml"), "run",
            f"http://127.0.0.1:{port}/openapi.json", "--header", f"Authorization: {client.headers['Authorization']}",
            *CHECKS, "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--request-timeout", "120",
            "--generation-database", "none", "--report", "json", "--report-json-path", str(report), "--no-color",
        ]  # fmt: skip
        run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
        assert api.popen.poll() is None, f"the API died under fuzzing:\n{api.tail()}"
    finally:
        api.stop()
    summary = json.loads(report.read_text())
    assert run.returncode == 0 and summary["failures"] == [] and summary["errors"] == [], run.stdout[-20000:]
    cases = summary["test_cases"]["generated"]
    assert summary["complete"] and summary["operations"]["tested"] == summary["operations"]["total"] >= 34

    statuses = Counter(int(s) for s in re.findall(r'HTTP/1\.1" (\d{3})', api.log.read_text()))
    assert statuses and not [s for s in statuses if s >= 500], statuses
    # The seeded ids reached the endpoints' own logic: the model answered predictions, the job its events.
    log = api.log.read_text()
    for operation in (f"POST /v1/models/{ids['model_id'][0]}/predict", f"GET /v1/jobs/{ids['job_id'][0]}/events"):
        reached = re.findall(rf'"{operation}[^" ]* HTTP/1\.1" (\d+)', log)
        assert {"200", "415"} & set(reached), (operation, Counter(reached))
    # "Missing test data" means mostly 404s among the 4xx answers that schemathesis counts, which leave
    # out 409 and 429. A DELETE has one success; a resume answers 409 (not paused) or 429 (the
    # tenant's concurrent jobs, filled by the sweep's) beside that. An image's path has slashes, which
    # schemathesis never puts in a path parameter (a given one is filtered out, failing its health
    # check): the thumbnail answers its 404s here, and tests/datasets/test_images.py the rest.
    expected = {"POST /v1/jobs/{job_id}/resume", "GET /v1/datasets/{dataset_id}/images/{path}"}
    assert all(op.startswith("DELETE") or op in expected for op in summary["warnings"]["missing_test_data"]), summary

    print(f"schemathesis: {cases} cases, {sum(statuses.values())} requests, 0 failures; statuses {dict(statuses)}")
