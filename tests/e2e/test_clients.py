"""The clients people use, against a real server (uvicorn, Celery workers, redis-server): the
Python SDK (clients/python) runs the whole flow with a webhook receiver on 127.0.0.1 verifying the
signatures; it installs into a clean venv without torch; and a Python client generated from
/openapi.json by openapi-python-client runs the flow too, as a microservice team would (the contract
stays generator-friendly: clean operation ids, one flat strategy enum)."""

import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import visiontune_client as vt

from tests.conftest import HYMENOPTERA, REPO, start_stack, wait_until
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

GENERATOR = Path(sys.executable).with_name("openapi-python-client")
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

            job = client.jobs.create(dataset.id, strategy="linear_probe", model_name="bugs").wait(progress=True)
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

        wait_until(lambda: len(receiver.requests) >= 3, 60, "three webhook deliveries", processes=stack.processes)
        payloads = receiver.verified(hook.secret)
        assert sorted(p["type"] for p in payloads) == ["dataset.ready", "job.succeeded", "model.exported"]
    finally:
        receiver.close()
    with vt.Client(base_url=stack.url, api_key="vt_wrong_key") as wrong, pytest.raises(vt.AuthenticationError):
        wrong.me()


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
