"""The clients people use, against a real server (uvicorn, Celery workers, redis-server): the
Python SDK (clients/python) runs the whole flow with a webhook receiver on 127.0.0.1 verifying the
signatures; the `visiontune` command runs it as a person types it (subprocesses, output read back,
Ctrl-C answered on a pseudo-terminal); the SDK and its command install into a clean venv without
torch; and a Python client generated from
/openapi.json by openapi-python-client runs the flow too, as a microservice team would (the contract
stays generator-friendly: clean operation ids, one flat strategy enum)."""

import importlib
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import visiontune_client as vt

from tests.conftest import HYMENOPTERA, REPO, free_port, start_stack, wait_until
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

GENERATOR = Path(sys.executable).with_name("openapi-python-client")
VISIONTUNE = Path(sys.executable).with_name("visiontune")  # the console script, as installed
BEE = sorted((HYMENOPTERA / "val" / "bees").iterdir())[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    stack = start_stack(tmp_path_factory, redis_url, VISIONTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES="true")
    yield stack
    stack.stop()


def key_of(stack) -> str:
    return stack.http.headers["Authorization"].removeprefix("Bearer ")


def image_folder(root: Path, per_split: dict[str, int]) -> Path:
    """An ImageFolder tree for the SDK to pack: a few real photos per class, copied from ../shared."""
    for split, count in per_split.items():
        for label in ("ants", "bees"):
            (root / split / label).mkdir(parents=True)
            for path in sorted((HYMENOPTERA / split / label).iterdir())[:count]:
                shutil.copy(path, root / split / label / path.name)
    return root


def test_the_sdk_runs_the_whole_flow(stack, tmp_path, capfd):
    receiver = Receiver()
    try:
        with vt.Client(base_url=stack.url, api_key=key_of(stack)) as client:
            hook = client.webhooks.create(receiver.url, ["dataset.ready", "job.succeeded", "model.exported"])
            uploaded = client.datasets.upload(image_folder(tmp_path / "bugs", {"train": 12, "val": 8}), name="bugs")
            dataset = client.datasets.wait(uploaded.id)  # follows the dataset's event stream
            assert (dataset.status, dataset.num_images) == ("ready", 40)
            audit = client.datasets.audit(dataset.id)  # computed by the background worker (a Celery pool process)
            assert audit.status == "ready" and audit.result["images"] == 40, audit

            # 300 epochs: 30 on 24 images are over before a progress line could show their speed.
            job = client.jobs.create(dataset.id, strategy="linear_probe", model_name="bugs",
                                     hyperparameters={"epochs": 300}).wait(progress=True)  # fmt: skip
            assert job.status == "succeeded" and job.model_id and job.metrics["val_accuracy"] >= 0.75
            live = capfd.readouterr().err  # the live line: phase, epoch, accuracy, images/s, time left
            assert "img/s" in live and "epoch" in live and "val_accuracy" in live, live

            [prediction] = client.models.predict("bugs@1", [BEE]).predictions
            assert (prediction.filename, prediction.label) == (BEE.name, "bees")
            export = client.models.export("bugs@1")
            assert export.status == "ready" and export.parity["top1_agreement"] == 1.0
            onnx = client.models.download_export("bugs@1", "onnx", tmp_path / "bugs.onnx")
            assert onnx.stat().st_size == export.size_bytes

            with pytest.raises(vt.NotFoundError) as missing:
                client.jobs.get("job_" + "0" * 24)
            assert missing.value.code == "job_not_found" and missing.value.status_code == 404
            with pytest.raises(vt.InvalidDatasetError):  # refused before anything is sent
                client.datasets.upload(tmp_path / "bugs" / "train" / "ants")
            assert [d.name for d in client.datasets.list()] == ["bugs"]
            assert [j.id for j in client.jobs.iter(page_size=1)] == [j.id for j in client.jobs.list()]  # `after` pages

        wait_until(lambda: len(receiver.requests) >= 3, 60, "three webhook deliveries", processes=stack.processes)
        payloads = receiver.verified(hook.secret)
        assert sorted(p["type"] for p in payloads) == ["dataset.ready", "job.succeeded", "model.exported"]
    finally:
        receiver.close()
    with vt.Client(base_url=stack.url, api_key="vt_wrong_key") as wrong, pytest.raises(vt.AuthenticationError):
        wrong.me()


def visiontune(stack, *argv: str, **options) -> subprocess.CompletedProcess:
    """`visiontune ARGV...` as typed at a terminal, with the server and key in the environment."""
    env = {**os.environ, "VISIONTUNE_API_URL": stack.url, "VISIONTUNE_API_KEY": key_of(stack)}
    return subprocess.run([str(VISIONTUNE), *argv], env=env, capture_output=True, text=True, timeout=600, **options)


def test_the_cli_runs_the_whole_flow_as_typed(stack, tmp_path):
    folder = image_folder(tmp_path / "insects", {"train": 12, "val": 8})
    upload = visiontune(stack, "datasets", "upload", str(folder), "--name", "insects")
    assert upload.returncode == 0, upload.stderr
    assert "ready, 40 images" in upload.stdout and "ants   12     8" in upload.stdout, upload.stdout
    dataset_id = next(d["id"] for d in json.loads(visiontune(stack, "datasets", "list", "--json").stdout)
                      if d["name"] == "insects")  # fmt: skip

    # 300 epochs: a probe's 30 epochs on 24 images are over in a fraction of a second, before any
    # progress line could show their speed.
    train = visiontune(stack, "jobs", "create", "--dataset", dataset_id, "--strategy", "linear_probe", "--model-name",
                       "insects", "--epochs", "300", "--wait")  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert "succeeded (mobilenetv2_100, linear_probe)" in train.stdout and "val_accuracy: " in train.stdout
    # Not a terminal: the live status comes a line per change (phase, epoch, accuracy, speed, time left).
    assert any("epoch" in line and "img/s" in line and "ETA" in line for line in train.stderr.splitlines()), train.stderr
    job_id = train.stderr.split()[1]
    logs = visiontune(stack, "jobs", "logs", "--follow", job_id)  # a finished job: replayed, then the end
    assert logs.returncode == 0 and " data " in logs.stdout, logs.stdout
    assert logs.stdout.splitlines()[-1] == "-- the job ended: succeeded", logs.stdout

    predict = visiontune(stack, "predict", "insects@1", str(BEE))
    assert predict.returncode == 0, predict.stderr
    header, first, second = predict.stdout.splitlines()
    assert header.split() == ["IMAGE", "RANK", "LABEL", "SCORE"] and first.split()[:3] == [str(BEE), "1", "bees"]
    assert second.split()[:2] == ["2", "ants"] and float(first.split()[3]) > float(second.split()[2])

    export = visiontune(stack, "models", "export", "insects@1")
    assert export.returncode == 0 and "onnx export of model_" in export.stdout and ": ready," in export.stdout
    download = visiontune(stack, "models", "download", "insects@1", "-o", str(tmp_path / "insects.zip"))
    assert download.returncode == 0 and (tmp_path / "insects.zip").stat().st_size > 1_000_000, download.stderr
    alias = visiontune(stack, "models", "alias", "insects", "production", "1")
    assert alias.stdout.strip() == "insects@production -> version 1", alias.stderr
    as_json = json.loads(visiontune(stack, "predict", "insects@production", str(BEE), "--json").stdout)
    assert as_json["predictions"][0]["labels"][0]["label"] == "bees"

    # Ctrl-C while following a job asks whether to cancel it; answered on the terminal: yes.
    terminal, their_end = pty.openpty()
    env = {**os.environ, "VISIONTUNE_API_URL": stack.url, "VISIONTUNE_API_KEY": key_of(stack)}
    follow = subprocess.Popen([str(VISIONTUNE), "jobs", "create", "--dataset", dataset_id, "--strategy", "full",
                               "--epochs", "50", "--wait"], stdin=their_end, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True)  # fmt: skip
    os.close(their_end)
    try:
        job_id = follow.stderr.readline().split()[1]  # "job <id> queued; following it"
        while "epoch" not in follow.stderr.readline():  # training, shown live
            pass
        follow.send_signal(signal.SIGINT)
        os.write(terminal, b"y\n")
        out, err = follow.communicate(timeout=120)
    finally:
        os.close(terminal)
        follow.kill()
    assert follow.returncode == 130 and f"Cancel job {job_id}? [y/N]" in out and f"job {job_id} cancelled" in err
    assert "Traceback" not in err
    with vt.Client(base_url=stack.url, api_key=key_of(stack)) as client, pytest.raises(vt.JobCancelledError):
        client.jobs.wait(job_id, timeout=120)


@pytest.mark.parametrize("case", ["wrong key", "wrong URL", "server down", "unknown job"])
def test_cli_errors_are_one_clear_line(stack, case):
    argv = {
        "wrong key": ["models", "list", "--api-key", "vt_not_a_key"],
        "wrong URL": ["models", "list", "--url", f"{stack.url}/api"],  # a server, but not the API's root
        "server down": ["models", "list", "--url", f"http://127.0.0.1:{free_port()}"],
        "unknown job": ["jobs", "show", "job_" + "0" * 24],
    }[case]
    result = visiontune(stack, *argv)
    expected = {"wrong key": "[401 invalid_api_key]", "wrong URL": "No endpoint GET /api/v1/models here: is the API's base URL right? [404 not_found]",
                "server down": "connection refused", "unknown job": "[404 job_not_found]"}[case]  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("visiontune: error: "), result.stderr
    assert expected in result.stderr, result.stderr


def test_the_sdk_installs_without_torch(tmp_path):
    """A client-only install: the SDK and httpx, nothing of the server's (no torch, no numpy)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c", str(REPO / "constraints.txt")]
    subprocess.run([*pip, str(REPO / "clients" / "python")], check=True, env={**os.environ, "PIP_NO_INPUT": "1"})
    probe = "import sys, visiontune_client; print(sorted(m for m in ('torch', 'numpy', 'fastapi') if m in sys.modules))"
    assert subprocess.check_output([str(venv / "bin" / "python"), "-c", probe], text=True).strip() == "[]"
    installed = subprocess.check_output([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], text=True)
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert "visiontune-client" in names and "httpx" in names
    assert not names & {"torch", "torchvision", "timm", "numpy", "fastapi", "celery"}, names
    # The client commands come with it; the server's (serve, worker, ...) only with the server.
    usage = subprocess.check_output([str(venv / "bin" / "visiontune"), "--help"], text=True)
    assert all(command in usage for command in ("datasets", "jobs", "predict", "models")), usage
    assert "serve" not in usage and "worker" not in usage, usage


def poll(read, done, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not done(value := read()):
        assert time.monotonic() < deadline, f"still {value}"
        time.sleep(0.5)
    return value


def test_a_generated_client_runs_the_whole_flow(stack, small_hymenoptera_zip, tmp_path):
    (tmp_path / "openapi.json").write_bytes(stack.http.get("/openapi.json").content)
    (tmp_path / "config.yml").write_text("package_name_override: visiontune_generated\n")
    subprocess.run([str(GENERATOR), "generate", "--path", "openapi.json", "--config", "config.yml", "--meta", "none",
                    "--output-path", "visiontune_generated"], cwd=tmp_path, check=True, capture_output=True)  # fmt: skip
    sys.path.insert(0, str(tmp_path))
    try:
        generated = importlib.import_module("visiontune_generated")
        from visiontune_generated.api.datasets import datasets_get, datasets_upload
        from visiontune_generated.api.jobs import jobs_create, jobs_get
        from visiontune_generated.api.models import models_predict
        from visiontune_generated.models import (
            DatasetsUploadBody,
            JobCreate,
            JobCreateStrategy,
            ModelsPredictFilesBody,
        )
        from visiontune_generated.types import File
    finally:
        sys.path.remove(str(tmp_path))

    with generated.AuthenticatedClient(base_url=stack.url, token=key_of(stack), timeout=None) as client:
        archive = File(payload=small_hymenoptera_zip.open("rb"), file_name="small.zip", mime_type="application/zip")
        dataset = datasets_upload.sync(client=client, body=DatasetsUploadBody(file=archive, name="generated"))
        dataset = poll(lambda: datasets_get.sync(dataset.id, client=client), lambda d: d.status != "processing")
        assert dataset.status == "ready", dataset

        # An explicit strategy: the flat enum builds (a union of a const and an enum did not).
        request = JobCreate(dataset_id=dataset.id, backbone="mobilenetv2_100", strategy=JobCreateStrategy.LINEAR_PROBE)
        job = jobs_create.sync(client=client, body=request)
        assert job.status == "queued" and job.strategy == "linear_probe"
        job = poll(lambda: jobs_get.sync(job.id, client=client), lambda j: j.status in ("succeeded", "failed"))
        assert job.status == "succeeded" and isinstance(job.model_id, str), job

        with BEE.open("rb") as image:
            body = ModelsPredictFilesBody(files=[File(payload=image, file_name=BEE.name, mime_type="image/jpeg")])
            answer = models_predict.sync(job.model_id, client=client, body=body, top_k=2)
        [prediction] = answer.predictions
        assert prediction.filename == BEE.name and prediction.labels[0].label == "bees"
