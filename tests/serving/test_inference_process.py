"""The inference process (app/serving/inference_process.py), started as `visiontune serve` starts it:
a real child process on a real Unix socket, serving a real mobilenetv2 artifact on real photos. On
this CPU machine it runs on the CPU (`VISIONTUNE_SERVING_INFERENCE_PROCESS=on`); on a GPU machine
the same tests run it on the GPU, as `auto` does there."""

import asyncio
import shutil
import signal
import time

import anyio
import pytest
import torch

from app.core.config import Settings
from app.ml.backbone import build_model
from app.ml.export import save_artifact
from app.ml.onnx_export import export_onnx
from app.serving.inference_process import InferenceProcesses
from app.serving.predictor import ModelCache, preprocess, serving_device
from app.serving.remote import InferenceClient, InferenceFailed, InferenceUnavailable, RemoteModels
from app.serving.service import Serving
from tests.conftest import HYMENOPTERA, MOBILENET_WEIGHTS

MAX_PIXELS = 10**8


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    directory = tmp_path_factory.mktemp("inference") / "model"
    save_artifact(build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS), directory, ["ants", "bees"], {},
                  temperature=1.3)  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def photos():
    paths = sorted((HYMENOPTERA / "val" / "ants").iterdir())[:4] + sorted((HYMENOPTERA / "val" / "bees").iterdir())[:4]
    return [(path.name, path.read_bytes()) for path in paths]


@pytest.fixture(scope="module")
def inference():
    # A batching window no test outlives: concurrent requests fill their batch long before it closes.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VISIONTUNE_MAX_WAIT_MS", "60000")
        patch.setenv("VISIONTUNE_MAX_BATCH_SIZE", "8")
        # A runtime named, so which one serves a model with an ONNX export is known (`auto` would
        # time them). Without an export, as in most tests here, PyTorch serves either way.
        patch.setenv("VISIONTUNE_SERVING_RUNTIME", "onnxruntime")
        processes = InferenceProcesses([None])
    try:
        processes.wait_ready()
        yield processes
    finally:
        processes.stop()


async def _remote(inference, artifact):
    """An API process's view of the model, as `Serving` gets it: through a worker thread."""
    models = RemoteModels(InferenceClient(inference.sockets[0]), "auto")
    return await anyio.to_thread.run_sync(models.get, "m", artifact, {})


def test_its_answers_equal_the_api_process_own_and_requests_from_many_connections_share_batches(
    inference, artifact, photos
):
    # On a GPU machine both run on the GPU (as the inference process's `auto` does), where batches
    # of other sizes differ a little more (as in test_the_gpu_serves_the_same_probabilities_as_the_cpu).
    device = serving_device("auto")
    tolerance = 1e-5 if device == "cpu" else 1e-4
    local = ModelCache(10**12, 1, 0, "torch", device).get("m", artifact, {})
    pixels = preprocess(local, photos, MAX_PIXELS)
    expected = torch.cat([local.probabilities(pixels[i : i + 1]) for i in range(len(pixels))])
    expected_features = local.embeddings(pixels)

    async def scenario():
        remote = await _remote(inference, artifact)
        sent = preprocess(remote, photos, MAX_PIXELS)
        # Eight clients at once, each on its own connection, as eight requests of several API processes.
        views = [await _remote(inference, artifact) for _ in photos]
        answers = await asyncio.gather(*(view.submit(sent[i : i + 1]) for i, view in enumerate(views)))
        return remote, sent, answers, await remote.embed(sent)

    remote, sent, answers, features = asyncio.run(scenario())
    assert sent.dtype == torch.uint8 and torch.equal(sent.float() / 255, pixels)  # a quarter of the bytes, same values
    assert remote.labels == ["ants", "bees"] and remote.resize == local.resize and remote.runtime == "torch"
    assert [batch for _, batch in answers] == [8] * 8  # one forward pass for the eight connections
    served = torch.cat([rows for rows, _ in answers])
    assert torch.allclose(served, expected, atol=tolerance) and torch.equal(served.argmax(1), expected.argmax(1))
    assert torch.allclose(features, expected_features, atol=10 * tolerance)


def test_a_model_that_cannot_load_is_an_error_and_the_process_serves_on(inference, artifact, photos, tmp_path):
    async def scenario():
        broken = RemoteModels(InferenceClient(inference.sockets[0]), "auto")
        (tmp_path / "gone").mkdir()
        (tmp_path / "gone" / "config.json").write_text((artifact / "config.json").read_text())  # weights missing
        with pytest.raises(InferenceFailed, match="No suitable checkpoints"):
            await anyio.to_thread.run_sync(broken.get, "gone", tmp_path / "gone", {})
        remote = await _remote(inference, artifact)
        rows, _ = await remote.submit(preprocess(remote, photos, MAX_PIXELS))  # a full batch: no window to wait out
        return rows

    assert asyncio.run(scenario()).shape == (len(photos), 2)


def test_a_model_is_loaded_again_for_an_export_finished_since(inference, artifact, tmp_path):
    """Each request names the model's ready exports: one the inference process loaded the model
    without (it finished since) has the model loaded again, to serve on it."""
    onnx_file = tmp_path / "model.onnx"
    assert export_onnx(artifact, onnx_file, sorted((HYMENOPTERA / "val" / "ants").iterdir())[:4]).passed

    async def scenario():
        client = InferenceClient(inference.sockets[0])
        runtimes = []
        for exports in ({}, {}, {"onnx": str(onnx_file)}, {"onnx": str(onnx_file)}):
            header = {"op": "load", "model_id": "exported", "directory": str(artifact), "exports": exports}
            runtimes.append((await client.call(header))[0]["runtime"])
        return runtimes

    assert asyncio.run(scenario()) == ["torch", "torch", "onnxruntime", "onnxruntime"]


def test_a_killed_inference_process_is_started_again_and_requests_answer_503_meanwhile(inference, artifact, photos):
    async def scenario():
        remote = await _remote(inference, artifact)
        pixels = preprocess(remote, photos, MAX_PIXELS)  # a full batch: no window to wait out
        before, _ = await remote.submit(pixels)
        victim = inference._children[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        unavailable, deadline = 0, time.monotonic() + 120
        while True:  # the kept connection is dead: the client tries a new one, refused until the restart
            try:
                after, _ = await remote.submit(pixels)  # the new process loads the model the request names
                break
            except InferenceUnavailable as exc:
                assert exc.status_code == 503 and exc.headers == {"Retry-After": "1"}
                unavailable += 1
                assert time.monotonic() < deadline, "the inference process was not started again"
                await asyncio.sleep(0.2)
        return victim.pid, before, after, unavailable

    victim, before, after, unavailable = asyncio.run(scenario())
    assert inference._children[0].pid != victim and inference._children[0].poll() is None
    assert unavailable >= 1  # the process takes seconds to start: the requests meanwhile got 503
    assert torch.allclose(before, after, atol=1e-5)  # (a new process may pick other GPU kernels)


def test_a_deleted_model_leaves_the_inference_process(inference, artifact, photos, tmp_path):
    """`Serving.unload` (the delete route) drops the model there too: once its files are gone, a
    request that still names it finds nothing loaded and nothing to load."""
    shutil.copytree(artifact, tmp_path / "doomed")
    serving = Serving(Settings(data_dir=tmp_path, inference_sockets=inference.sockets[0]))

    async def scenario():
        doomed = await anyio.to_thread.run_sync(serving.cache.get, "doomed", tmp_path / "doomed", {})
        pixels = preprocess(doomed, photos, MAX_PIXELS)
        shutil.rmtree(tmp_path / "doomed")
        held, _ = await doomed.submit(pixels)  # still loaded there
        await anyio.to_thread.run_sync(serving.unload, "doomed")
        assert serving.cache.cached("doomed") is None
        with pytest.raises(InferenceFailed, match="not found|No such file|No suitable checkpoints"):
            await doomed.submit(pixels)
        return held

    assert asyncio.run(scenario()).shape == (len(photos), 2)


def test_visiontune_serve_runs_one_inference_process_per_visible_gpu_when_auto(monkeypatch):
    """Which inference processes `visiontune serve` starts (a GPU is faked: this machine has none)."""
    from app.serving import inference_process

    assert inference_process.inference_devices(Settings(serving_device="cpu")) is None  # auto on a CPU: off
    assert inference_process.inference_devices(Settings(serving_device="cpu", serving_inference_process="on")) == [None]
    monkeypatch.setattr(inference_process.predictor, "serving_device", lambda setting: "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert inference_process.inference_devices(Settings()) == ["2", "3"]
    assert inference_process.inference_devices(Settings(serving_inference_process="off")) is None
