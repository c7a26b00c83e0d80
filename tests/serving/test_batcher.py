"""The micro-batcher and the model cache, in-process."""

import asyncio
import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from pydantic import ValidationError

from app.core.config import Settings
from app.ml.backbone import build_model
from app.ml.export import save_artifact
from app.ml.onnx_export import export_onnx, export_onnx_int8
from app.serving import predictor
from app.serving.batcher import MicroBatcher
from app.serving.predictor import ModelCache, preprocess, serving_device
from tests.conftest import HYMENOPTERA, MOBILENET_WEIGHTS


# A batching window no test outlives: a batch that a test expects full is filled long before it could
# close, however slow the machine. (No test here depends on a short window closing late enough.)
NEVER_MS = 60_000


def test_concurrent_requests_share_forward_passes_and_get_their_own_rows():
    calls = []

    def double(images: list[torch.Tensor]) -> torch.Tensor:
        calls.append(len(images))
        return torch.stack(images) * 2

    async def scenario():
        batcher = MicroBatcher(double, max_batch_size=8, max_wait_ms=NEVER_MS)
        inputs = [torch.full((2, 3), float(i)) for i in range(12)]  # 12 requests of 2 rows each
        # gather starts every request before the batching task first runs (asyncio runs tasks in the
        # order they were created), so all 24 rows are queued when it takes the first.
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        batcher.close()
        return inputs, results

    inputs, results = asyncio.run(scenario())
    for x, (rows, batch_size) in zip(inputs, results, strict=True):
        assert torch.equal(rows, x * 2)  # each request gets exactly its own rows back
        assert batch_size == 8
    assert calls == [8, 8, 8]  # 3 forward passes for 12 requests


def test_a_partial_batch_goes_when_its_window_closes():
    calls = []

    def record(images: list[torch.Tensor]) -> torch.Tensor:
        calls.append(len(images))
        return torch.stack(images)

    async def scenario():
        # What is in each batch does not depend on the window's length: the 3 rows of one request are
        # queued together, and the second request is only made once the first has its answer.
        batcher = MicroBatcher(record, max_batch_size=8, max_wait_ms=1)
        first = await batcher.submit(torch.zeros(3, 2))
        second = await batcher.submit(torch.ones(2, 2))
        batcher.close()
        return first, second

    (rows, size), (rows_2, size_2) = asyncio.run(scenario())
    assert calls == [3, 2] and (size, size_2) == (3, 2)
    assert torch.equal(rows, torch.zeros(3, 2)) and torch.equal(rows_2, torch.ones(2, 2))


def test_batching_off_runs_each_request_alone():
    async def scenario():
        batcher = MicroBatcher(lambda images: torch.stack(images) + 1, max_batch_size=1, max_wait_ms=50)
        return await asyncio.gather(*(batcher.submit(torch.zeros(1, 2)) for _ in range(3)))

    assert all(size == 1 and torch.equal(rows, torch.ones(1, 2)) for rows, size in asyncio.run(scenario()))


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on():
    def explode_on_negative(images):
        if (torch.stack(images) < 0).any():
            raise ValueError("bad batch")
        return torch.stack(images)

    async def scenario():
        batcher = MicroBatcher(explode_on_negative, max_batch_size=4, max_wait_ms=1)
        bad = await asyncio.gather(batcher.submit(-torch.ones(1, 1)), return_exceptions=True)
        # Submitted only once the bad batch has failed, so it cannot share that batch.
        good = await batcher.submit(torch.ones(1, 1))
        batcher.close()
        return bad, good

    bad, (rows, _) = asyncio.run(scenario())
    assert isinstance(bad[0], ValueError) and torch.equal(rows, torch.ones(1, 1))


def test_an_image_the_batch_cannot_take_fails_its_own_request_only():
    """As a JPEG that will not decode where the model runs (app/serving/device_decode.py): its row
    is an error, and the requests that shared its batch get their rows."""

    def halve_or_refuse(images):
        return [ValueError("refused") if (image < 0).any() else image / 2 for image in images]

    async def scenario(max_batch_size):
        batcher = MicroBatcher(halve_or_refuse, max_batch_size=max_batch_size, max_wait_ms=NEVER_MS)
        requests = [torch.full((1, 2), 2.0), -torch.ones(1, 2), torch.full((2, 2), 4.0)]
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
        batcher.close()
        return answers

    for max_batch_size, sizes in [(4, (4, 4)), (1, (1, 2))]:  # batched (one batch of 4), and with batching off
        first, refused, third = asyncio.run(scenario(max_batch_size))
        assert isinstance(refused, ValueError) and str(refused) == "refused"
        assert torch.equal(first[0], torch.ones(1, 2)) and torch.equal(third[0], torch.full((2, 2), 2.0))
        assert (first[1], third[1]) == sizes


def test_closing_from_another_thread_serves_every_queued_request_and_later_ones_alone():
    """An eviction closes the batcher from a worker thread while requests wait in its queue: each
    of them, and a request that arrives after the close, still gets its own answer."""
    started, release = threading.Event(), threading.Event()
    sizes = []

    def slow_double(images: list[torch.Tensor]) -> torch.Tensor:
        sizes.append(len(images))
        started.set()
        release.wait(timeout=60)  # the first batch holds on until the close has happened
        return torch.stack(images) * 2

    async def scenario():
        batcher = MicroBatcher(slow_double, max_batch_size=2, max_wait_ms=60_000)
        queued = [asyncio.ensure_future(batcher.submit(torch.full((1, 2), float(i)))) for i in range(5)]
        await asyncio.to_thread(started.wait, 60)  # the first batch of 2 is running, 3 images wait
        await asyncio.to_thread(batcher.close)  # from a thread, as the cache's eviction does
        release.set()
        late = await batcher.submit(torch.full((1, 2), 9.0))
        return await asyncio.wait_for(asyncio.gather(*queued), 60), late

    queued, (late_rows, late_size) = asyncio.run(scenario())
    assert [rows.tolist() for rows, _ in queued] == [[[2.0 * i] * 2] for i in range(5)]
    assert torch.equal(late_rows, torch.full((1, 2), 18.0)) and late_size == 1  # after the close: alone
    assert sorted(sizes) == [1, 1, 2, 2]  # the queue drained in batches (2, 2, 1) and the late one alone


def test_a_prediction_that_cannot_finish_answers_504_at_the_deadline(client, monkeypatch):
    """A forward pass that never returns (a wedged runtime, stood in for by a blocking function)
    must not leave the request hanging: the server's deadline answers 504."""
    from app.core.errors import DeadlineExceeded
    from app.serving.service import Serving

    serving: Serving = client.app.state.serving
    serving.settings = serving.settings.model_copy(update={"predict_timeout_s": 0.5})
    stuck = threading.Event()

    async def never(*_args, **_kwargs):
        try:
            await asyncio.to_thread(stuck.wait, 30)
        finally:  # cancelled at the deadline: let the thread go, or asyncio.run waits for it to end
            stuck.set()

    class Row:
        id, classes = "model_x", ["a", "b"]

    monkeypatch.setattr(serving, "_model", never)
    try:
        with pytest.raises(DeadlineExceeded) as exceeded:
            asyncio.run(serving.predict(Row(), [("a.jpg", b"")], None, None))
    finally:
        stuck.set()
    assert exceeded.value.status_code == 504 and exceeded.value.code == "prediction_timeout"


def _artifacts(tmp_path, count: int) -> list:
    """Real mobilenetv2 artifacts with untrained heads: the point here is their size and identity."""
    directories = []
    for i in range(count):
        model = build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS)
        directory = tmp_path / f"m{i}"
        save_artifact(model, directory, ["a", "b"], {}, temperature=1.0)
        directories.append(directory)
    return directories


def test_the_largest_batch_is_by_device_unless_set(monkeypatch):
    """8 on a CPU, 32 on a GPU (where one inference process batches every API process's requests),
    or what VISIONTUNE_MAX_BATCH_SIZE says. (A GPU is faked: making the cache touches no GPU.)"""
    assert ModelCache.from_settings(Settings(serving_device="cpu")).max_batch_size == 8
    assert ModelCache.from_settings(Settings(serving_device="cpu", max_batch_size=3)).max_batch_size == 3
    monkeypatch.setattr(predictor, "serving_device", lambda setting: "cuda")
    assert ModelCache.from_settings(Settings()).max_batch_size == 32
    assert ModelCache.from_settings(Settings(max_batch_size=1)).max_batch_size == 1  # batching off, as asked
    with pytest.raises(ValidationError):
        Settings(max_batch_size=0)


def test_cache_evicts_least_recently_used_models_past_its_byte_budget(tmp_path):
    directories = _artifacts(tmp_path, 3)
    no_export = {}
    one = ModelCache(max_bytes=10**12, max_batch_size=1, max_wait_ms=0).get("m0", directories[0], no_export).nbytes
    cache = ModelCache(max_bytes=int(2.5 * one), max_batch_size=1, max_wait_ms=0)
    first = cache.get("m0", directories[0], no_export)
    cache.get("m1", directories[1], no_export)
    assert cache.get("m0", directories[0], no_export) is first  # still cached, and now most recently used
    cache.get("m2", directories[2], no_export)  # over budget: the least recently used (m1) goes
    assert list(cache._models) == ["m0", "m2"] and cache.nbytes <= 2.5 * one


def test_concurrent_first_requests_load_a_model_once(tmp_path):
    (directory,) = _artifacts(tmp_path, 1)
    cache = ModelCache(max_bytes=10**12, max_batch_size=1, max_wait_ms=0)
    assert cache.cached("m0") is None
    requests = 8
    loads, real_load, real_cached = [], cache._load, cache.cached
    misses, all_missed, lock = [], threading.Event(), threading.Lock()

    def counted_cached(model_id):
        found = real_cached(model_id)
        if found is None:
            with lock:
                misses.append(model_id)
                if len(misses) == requests:
                    all_missed.set()
        return found

    def counted_load(*args):
        loads.append(args)
        # The load holds on until every request has looked in the cache and found nothing: all of
        # them arrive while it is under way, whatever the machine's speed.
        if not all_missed.wait(timeout=120):
            raise AssertionError(f"only {len(misses)} of {requests} requests arrived during the load")
        return real_load(*args)

    cache.cached, cache._load = counted_cached, counted_load
    with ThreadPoolExecutor(requests) as pool:
        served = list(pool.map(lambda _: cache.get("m0", directory, {}), range(requests)))
    assert len(misses) == requests and len(loads) == 1
    assert all(model is served[0] for model in served) and real_cached("m0") is served[0]


def test_an_evicted_model_is_freed(tmp_path):
    directories = _artifacts(tmp_path, 2)
    no_export = {}

    async def scenario() -> tuple[bool, list[str]]:
        cache = ModelCache(max_bytes=1, max_batch_size=4, max_wait_ms=1)  # room for one model at a time
        first = cache.get("m0", directories[0], no_export)
        await first.batcher.submit(torch.rand(1, 3, 224, 224))  # its batching task is now running
        weights = weakref.ref(first.classifier)
        del first
        cache.get("m1", directories[1], no_export)  # evicts m0 and closes its batcher
        for _ in range(100):  # its batching task ends within a few turns of the event loop (turns, not time)
            await asyncio.sleep(0)
            gc.collect()
            if weights() is None:
                break
        return weights() is None, list(cache._models)

    freed, kept = asyncio.run(scenario())
    assert kept == ["m1"]
    assert freed, "something still holds the evicted model's weights"


def test_onnxruntime_serves_the_same_probabilities_as_pytorch(tmp_path):
    directory, onnx_file = tmp_path / "model", tmp_path / "model.onnx"
    save_artifact(build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS), directory, ["ants", "bees"], {},
                  temperature=1.3)  # fmt: skip
    images = sorted((HYMENOPTERA / "val" / "bees").iterdir())[:8]
    assert export_onnx(directory, onnx_file, images).passed
    files = [(path.name, path.read_bytes()) for path in images]

    served = {}
    for runtime in ("torch", "onnxruntime"):
        loaded = ModelCache(10**12, 8, 0, runtime).get("m", directory, {"onnx": onnx_file})
        assert loaded.runtime == runtime
        pixels = preprocess(loaded, files, max_pixels=10**8)
        together = loaded.probabilities(pixels)
        one_by_one = torch.cat([loaded.probabilities(pixels[i : i + 1]) for i in range(len(pixels))])
        assert torch.allclose(together, one_by_one, atol=1e-5)
        served[runtime] = together
    assert (served["torch"] - served["onnxruntime"]).abs().max() <= 1e-4
    assert torch.equal(served["torch"].argmax(1), served["onnxruntime"].argmax(1))

    # auto times both on this machine and keeps the faster; without an export it can only be PyTorch.
    auto = ModelCache(10**12, 8, 0, "auto").get("m", directory, {"onnx": onnx_file})
    assert set(auto.timings) == {"torch", "onnxruntime"} and auto.runtime == min(auto.timings, key=auto.timings.get)
    assert ModelCache(10**12, 8, 0, "onnxruntime").get("m", directory, {}).runtime == "torch"


def test_an_int8_export_is_gated_and_auto_serves_the_fastest_runtime(tmp_path):
    """Static int8 quantization calibrated on real training images: the gate keeps or removes the
    file by its report, and `auto` times PyTorch, fp32 and int8 and serves the fastest."""
    directory, fp32_file, int8_file = tmp_path / "model", tmp_path / "model.onnx", tmp_path / "int8.onnx"
    save_artifact(build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS), directory, ["ants", "bees"], {},
                  temperature=1.3)  # fmt: skip
    train = sorted((HYMENOPTERA / "train" / "ants").iterdir())[:12] + sorted((HYMENOPTERA / "train" / "bees").iterdir())[:12]
    val = [(path, label) for label, name in enumerate(("ants", "bees")) for path in sorted((HYMENOPTERA / "val" / name).iterdir())[:10]]
    assert export_onnx(directory, fp32_file, [path for path, _ in val]).passed

    # A gate nothing passes, on the fp32 export made above (as a worker reuses a model's own).
    refused = export_onnx_int8(directory, int8_file, train, val, min_agreement=1.01, fp32_onnx=fp32_file)
    assert not refused.passed and not int8_file.exists()
    # The head of this model is untrained (random): its accuracy says nothing, so the gate is lifted
    # here; tests/e2e/test_redis_flow.py applies the real one to a trained model.
    # Without `fp32_onnx` it exports the fp32 graph itself first, as a worker does for a model without one.
    report = export_onnx_int8(directory, int8_file, train, val, min_agreement=0.0, max_accuracy_drop=1.0)
    assert report.passed and int8_file.exists() and report.images == 20 and report.calibration_images == 24
    assert report.top1_agreement >= 0.9  # int8 keeps the fp32 model's answers (a sanity bound, not the gate)

    exports = {"onnx": fp32_file, "onnx-int8": int8_file}
    auto = ModelCache(10**12, 8, 0, "auto").get("m", directory, exports)
    assert set(auto.timings) == {"torch", "onnxruntime", "onnxruntime-int8"}
    assert auto.runtime == min(auto.timings, key=auto.timings.get)
    assert ModelCache(10**12, 8, 0, "onnxruntime").get("m", directory, exports).runtime == "onnxruntime"  # fp32 as asked
    assert ModelCache(10**12, 8, 0, "onnxruntime").get("m", directory, {"onnx-int8": int8_file}).runtime == "torch"

    # What the int8 runtime serves, against PyTorch, on the validation images.
    files = [(path.name, path.read_bytes()) for path, _ in val]
    loaded = ModelCache(10**12, 8, 0, "torch").get("m", directory, exports)
    reference = loaded.probabilities(preprocess(loaded, files, max_pixels=10**8))
    loaded = ModelCache(10**12, 8, 0, "onnxruntime-int8").get("m", directory, exports)
    assert loaded.runtime == "onnxruntime-int8"
    quantized = loaded.probabilities(preprocess(loaded, files, max_pixels=10**8))
    assert (quantized.argmax(1) == reference.argmax(1)).double().mean() >= 0.9
    assert (quantized - reference).abs().median() < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CI has none; run on a GPU machine)")
def test_the_gpu_serves_the_same_probabilities_as_the_cpu(tmp_path):
    directory = tmp_path / "model"
    save_artifact(build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS), directory, ["ants", "bees"], {},
                  temperature=1.3)  # fmt: skip
    files = [(p.name, p.read_bytes()) for p in sorted((HYMENOPTERA / "val" / "bees").iterdir())[:8]]
    served = {}
    for device in ("cpu", "cuda"):
        loaded = ModelCache(10**12, 8, 0, "torch", device).get("m", directory, {})
        assert next(loaded.classifier.parameters()).device.type == device
        pixels = preprocess(loaded, files, max_pixels=10**8)
        together = loaded.probabilities(pixels)
        one_by_one = torch.cat([loaded.probabilities(pixels[i : i + 1]) for i in range(len(pixels))])
        assert together.device.type == "cpu" and torch.allclose(together, one_by_one, atol=1e-5)
        served[device] = together
    assert (served["cpu"] - served["cuda"]).abs().max() <= 1e-4
    assert torch.equal(served["cpu"].argmax(1), served["cuda"].argmax(1))
    assert serving_device("auto") == "cuda"


def test_pixels_equal_timm_eval_transform_with_torchvision_to_tensor():
    """`pixel_transform` converts to a tensor in NumPy (no thread pool), to exactly the values of
    timm's own eval transform (without its Normalize, which CalibratedClassifier holds)."""
    from timm.data import create_transform, resolve_model_data_config
    from torchvision import transforms

    from app.ml.backbone import pixel_transform
    from app.ml.data import load_rgb

    model = build_model("mobilenetv2_100", 2, weights_file=None)
    timm_steps = create_transform(**resolve_model_data_config(model), is_training=False).transforms
    reference = transforms.Compose([t for t in timm_steps if not isinstance(t, transforms.Normalize)])
    for path in sorted((HYMENOPTERA / "val" / "ants").iterdir())[:10]:
        ours, theirs = pixel_transform(model)(load_rgb(path)), reference(load_rgb(path))
        assert ours.dtype == torch.float32 and ours.is_contiguous() and torch.equal(ours, theirs)
