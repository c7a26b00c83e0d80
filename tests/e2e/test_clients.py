"""The clients people use, against a real server (uvicorn, Celery workers, redis-server): a Python
client generated from /openapi.json by openapi-python-client runs the whole flow, as a microservice
team would (the contract stays generator-friendly: clean operation ids, one flat strategy enum)."""

import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import HYMENOPTERA, start_stack

pytestmark = pytest.mark.e2e

GENERATOR = Path(sys.executable).with_name("openapi-python-client")
BEE = sorted((HYMENOPTERA / "val" / "bees").iterdir())[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    stack = start_stack(tmp_path_factory, redis_url)
    yield stack
    stack.stop()


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

    token = stack.http.headers["Authorization"].removeprefix("Bearer ")
    with generated.AuthenticatedClient(base_url=stack.url, token=token, timeout=None) as client:
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
