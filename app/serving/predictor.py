"""Loading trained models for prediction and running them.

Models are loaded from their artifact exactly as a timm user would (`local-dir:`), with the eval
preprocessing resolved from that artifact's own config and the calibration temperature stored
beside it. A model with a parity-checked ONNX export runs in onnxruntime instead when that is
faster (timed at load; `VISIONTUNE_SERVING_RUNTIME`). Decoding and forward passes run in threads,
never on the event loop.
"""

import asyncio
import contextlib
import ctypes
import gc
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import resolve_model_data_config

from app.core import metrics
from app.core.config import Settings
from app.core.errors import Invalid, UnsupportedMedia
from app.ml import onnx_export
from app.ml.backbone import CalibratedClassifier, fold_batch_norms, load_artifact, pixel_transform, unit_pixels
from app.ml.data import eval_resize, upright_rgb
from app.ml.image_formats import IMAGE_FORMATS
from app.ml.export import read_temperature
from app.serving import device_decode
from app.serving.batcher import MicroBatcher
from app.serving.device_decode import EncodedJpeg

logger = logging.getLogger(__name__)


class CudaGraphs:
    """A classifier's forward pass as CUDA graphs, one per batch size up to `max_batch_size`, each
    captured on first use and replayed after. At serving's small batches an eager forward on a GPU
    is bound by the CPU launching its kernels one by one (bench/gpu_serving.py, mobilenetv2_100 on
    an H100: 6.5 ms eager, 0.8 ms replayed at batch 1), and that CPU is what decodes the images.
    Replays share their input and output buffers, so one runs at a time. uint8 pixels (from the
    inference process) get graphs of their own that scale them to [0, 1] on the GPU.

    All of a model's graphs share one memory pool, so their activations take the memory of the
    largest batch's alone, not of every batch size's together (up to 64 graphs at a GPU's default
    largest batch of 32). That is safe here whatever order they replay in: replays never overlap,
    and each copies its output out before the next begins.

    The thread waits for each result on an event with blocking synchronisation: it sleeps, where
    `.cpu()` would spin on a core (CUDA's default while a process has fewer active contexts than
    cores), taking it from the threads that decode the next images."""

    def __init__(self, module: torch.nn.Module, max_batch_size: int):
        self.module, self.max_batch_size = module, max_batch_size
        self._graphs: dict[tuple[int, torch.dtype], _Graph] = {}
        self._lock = threading.Lock()
        self._pool = None  # made at the first capture

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._lock:
            captured = self._graphs.get((len(pixels), pixels.dtype)) or self._capture(pixels)
            captured.static_in.copy_(pixels)
            captured.graph.replay()
            captured.host_out.copy_(captured.static_out, non_blocking=True)
            captured.done.record()
            captured.done.synchronize()
            return captured.host_out.clone()

    def _capture(self, pixels: torch.Tensor) -> "_Graph":
        device = next(self.module.parameters()).device
        static_in = torch.empty_like(pixels, device=device).contiguous(memory_format=torch.channels_last)
        static_in.copy_(pixels)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # a capture needs the kernels chosen and the memory allocated already
                self.module(float_pixels(static_in))
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            static_out = self.module(float_pixels(static_in))
        host_out = torch.empty(static_out.shape, dtype=static_out.dtype, pin_memory=True)
        key = (len(pixels), pixels.dtype)
        self._graphs[key] = _Graph(graph, static_in, static_out, host_out, torch.cuda.Event(blocking=True))
        return self._graphs[key]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor  # on the GPU: each call's pixels are copied in
    static_out: torch.Tensor  # on the GPU: what a replay writes
    host_out: torch.Tensor  # pinned CPU memory that static_out is copied to
    done: torch.cuda.Event  # recorded after that copy


# Each export format, and the runtime name a prediction reports (X-Runtime) when it serves.
EXPORT_RUNTIMES = {"onnx": "onnxruntime", "onnx-int8": "onnxruntime-int8"}


@dataclass
class LoadedModel:
    classifier: CalibratedClassifier  # [0, 1] pixels -> calibrated probabilities, in PyTorch
    onnx: onnxruntime.InferenceSession | None  # the same function from a parity-checked export, if chosen
    transform: Callable  # PIL image -> [0, 1] pixels
    resize: int  # the longest side `transform` resizes to: JPEGs are decoded no larger than needed
    labels: list[str]
    nbytes: int
    batcher: MicroBatcher
    device: torch.device  # where the PyTorch classifier runs; pixels arrive and results leave on the CPU
    timings: dict[str, float] | None = None  # seconds per runtime, when `auto` timed them at load
    exports_seen: frozenset[str] = frozenset()  # the ready export formats when it was loaded
    export_may_come: bool = False  # loaded without every export while onnxruntime was allowed: one may appear
    graphs: CudaGraphs | None = None  # the PyTorch forward replayed as CUDA graphs, on a GPU
    onnx_runtime: str = "onnxruntime"  # which export `onnx` runs: "onnxruntime" (fp32) or "onnxruntime-int8"
    decode_steps: list | None = None  # `transform`'s resize and crop, when they run on tensors (device_decode)

    @property
    def runtime(self) -> str:
        return "torch" if self.onnx is None else self.onnx_runtime

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels`: float32 in [0, 1], or the same as uint8 (the inference process's), which are
        scaled where the forward pass runs."""
        if self.onnx is not None:
            inputs = {onnx_export.INPUT_NAME: float_pixels(pixels).numpy()}
            (probabilities,) = self.onnx.run([onnx_export.OUTPUT_NAME], inputs)
            return torch.from_numpy(probabilities)
        if self.graphs is not None and len(pixels) <= self.graphs.max_batch_size:
            return self.graphs(pixels)
        with torch.inference_mode():
            return self.classifier(self._on_device(pixels)).cpu()

    def forward(self, images: list) -> list[torch.Tensor | Exception]:
        """The micro-batcher's forward pass: a row of probabilities per image of the batch. JPEGs
        among them (`EncodedJpeg`) are decoded first, where the model runs; one that will not
        decode gets its error in place of its row."""
        if not any(isinstance(image, EncodedJpeg) for image in images):
            return list(self.probabilities(torch.stack(images)))
        jpegs = [image for image in images if isinstance(image, EncodedJpeg)]
        decoded = iter(device_decode.decode(jpegs, self.decode_steps, self.device))
        pixels = [next(decoded) if isinstance(image, EncodedJpeg) else image.to(self.device) for image in images]
        usable = [p for p in pixels if isinstance(p, torch.Tensor)]
        if len({p.dtype for p in usable}) > 1:  # decoded uint8 beside this process's own [0, 1] pixels
            usable = [float_pixels(p) for p in usable]
        rows = iter(self.probabilities(torch.stack(usable)) if usable else [])
        return [next(rows) if isinstance(p, torch.Tensor) else p for p in pixels]

    async def submit(self, images: torch.Tensor | list[EncodedJpeg]) -> tuple[torch.Tensor, int]:
        """Calibrated probabilities, through the micro-batcher; and the size of the forward pass."""
        return await self.batcher.submit(images)

    async def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return await asyncio.to_thread(self.embeddings, pixels)

    def embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.classifier.embeddings(self._on_device(pixels)).cpu()

    def _on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        return float_pixels(pixels.to(self.device, non_blocking=True)).contiguous(memory_format=torch.channels_last)


def float_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] float32 pixels as they are, uint8 ones scaled to them."""
    return unit_pixels(pixels) if pixels.dtype == torch.uint8 else pixels


class ModelCache:
    """Loaded models of one API process, least recently used evicted past `max_bytes` of weights.

    Concurrent first requests for a model load it once; the model in use is never evicted by its
    own load, so a single model larger than the budget still serves.
    """

    def __init__(
        self, max_bytes: int, max_batch_size: int, max_wait_ms: float, runtime: str = "auto", device: str = "cpu",
        cuda_graphs: bool = True,
    ):  # fmt: skip
        self.max_bytes, self.max_batch_size, self.max_wait_ms = max_bytes, max_batch_size, max_wait_ms
        self.runtime, self.device = runtime, torch.device(device)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> "ModelCache":
        """The cache a serving process (an API process, or an inference process) runs."""
        device = serving_device(settings.serving_device)
        return cls(
            settings.model_cache_bytes,
            max_batch_size(settings, device),
            settings.max_wait_ms,
            settings.serving_runtime,
            device,
            settings.serving_cuda_graphs,
        )

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self._models.values())

    def cached(self, model_id: str) -> LoadedModel | None:
        """The model if it is loaded (marked as just used); never waits for a load, so the event
        loop may call it."""
        with self._lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                return self._models[model_id]
        return None

    def get(self, model_id: str, directory: Path, exports: dict[str, Path]) -> LoadedModel:
        """`exports`: the model's parity-checked ONNX files by format ("onnx", "onnx-int8")."""
        if (loaded := self.cached(model_id)) is not None:
            return loaded
        with self._lock:
            load_lock = self._loading.setdefault(model_id, threading.Lock())
        with load_lock:
            with self._lock:
                if model_id in self._models:
                    return self._models[model_id]
            loaded = self._load(directory, exports)
            with self._lock:
                self._models[model_id] = loaded
                self._loading.pop(model_id, None)
                evicted = []
                while self.nbytes > self.max_bytes and len(self._models) > 1:
                    evicted.append(self._models.popitem(last=False)[1])
                metrics.CACHE_LOADS.inc()
                metrics.CACHE_EVICTIONS.inc(len(evicted))
                metrics.CACHE_BYTES.set(self.nbytes)
            if evicted:
                for model in evicted:
                    model.batcher.close()
                del evicted
                release_memory()
            return loaded

    def evict(self, model_id: str) -> None:
        with self._lock:
            evicted = self._models.pop(model_id, None)
            metrics.CACHE_BYTES.set(self.nbytes)
        if evicted is not None:
            metrics.CACHE_EVICTIONS.inc()
            evicted.batcher.close()
            del evicted
            release_memory()

    def _load(self, directory: Path, exports: dict[str, Path]) -> LoadedModel:
        model = load_artifact(directory).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        # Batch norms folded into their convolutions: PyTorch's forward pass 1.4-1.6x faster on a
        # CPU for mobilenetv2_100 and tf_efficientnet_lite0, within 1e-5 (app/ml/backbone.py).
        model = fold_batch_norms(model, torch.randn(2, *resolve_model_data_config(model)["input_size"]))
        # channels_last: the faster layout for convolutional backbones on CPUs and GPUs alike
        # (bench/serve_load.py measures both).
        classifier = CalibratedClassifier(model, read_temperature(directory)).eval()
        classifier = classifier.to(self.device, memory_format=torch.channels_last)
        transform = pixel_transform(model)
        loaded = LoadedModel(
            classifier=classifier,
            onnx=None,
            transform=transform,
            resize=eval_resize(transform).size,
            labels=list(model.pretrained_cfg["label_names"]),
            nbytes=sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
            batcher=None,  # set below: it needs the bound method
            device=self.device,
            graphs=CudaGraphs(classifier, self.max_batch_size) if self.cuda_graphs else None,
            decode_steps=device_decode.tensor_steps(transform),
        )
        loaded.exports_seen = frozenset(exports)
        loaded.export_may_come = export_may_come(self.runtime, exports)
        # `auto` considers every export this model has; a runtime named asks for its own export.
        allowed = EXPORT_RUNTIMES if self.runtime == "auto" else [f for f, name in EXPORT_RUNTIMES.items() if name == self.runtime]
        sessions = {EXPORT_RUNTIMES[f]: (self._session(exports[f]), exports[f]) for f in allowed if f in exports}
        if sessions:
            if self.runtime == "auto":
                loaded.timings = self._time_runtimes(loaded, {name: session for name, (session, _) in sessions.items()})
                chosen = min(loaded.timings, key=loaded.timings.get)
            else:
                chosen = self.runtime
            if chosen != "torch":
                loaded.onnx, loaded.onnx_runtime = sessions[chosen][0], chosen
                loaded.nbytes += sessions[chosen][1].stat().st_size
        loaded.batcher = MicroBatcher(loaded.forward, self.max_batch_size, self.max_wait_ms)
        return loaded

    @staticmethod
    def _session(onnx_file: Path) -> onnxruntime.InferenceSession:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # No busy-waiting between forward passes: spinning threads take the CPU that the
        # request threads need for decoding.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])

    def _time_runtimes(self, loaded: LoadedModel, sessions: dict[str, onnxruntime.InferenceSession]) -> dict[str, float]:
        """Time PyTorch and each export on a full batch of this model's input size, on this
        machine: which is fastest depends on the architecture and the hardware."""
        input_size = resolve_model_data_config(loaded.classifier.model)["input_size"]
        pixels = torch.rand(self.max_batch_size, *input_size)
        seconds = {}
        for name, onnx in [("torch", None), *sessions.items()]:
            loaded.onnx, loaded.onnx_runtime = onnx, name
            loaded.probabilities(pixels)  # warm-up: first calls allocate and pick kernels
            started = time.perf_counter()
            for _ in range(3):
                loaded.probabilities(pixels)
            seconds[name] = time.perf_counter() - started
        loaded.onnx, loaded.onnx_runtime = None, "onnxruntime"
        logger.info("runtime timings for %d images x3: %s", len(pixels), seconds)
        return seconds


def export_may_come(runtime: str, exports: dict[str, Path]) -> bool:
    """Whether a model loaded with these exports may later get one that `runtime` would serve:
    then the API asks now and then whether it has (and loads the model again)."""
    return runtime != "torch" and bool(set(EXPORT_RUNTIMES) - set(exports))


def max_batch_size(settings: Settings, device: str) -> int:
    """`VISIONTUNE_MAX_BATCH_SIZE`, or by where the forward passes run. On a CPU 8, chosen by
    measurement under concurrent clients (bench/serve_load.py prints batching on and off). On a GPU
    32: there one inference process batches the requests of every API process, one batch at a time,
    so its largest batch caps the throughput. A CUDA graph replay took 0.21 ms an image at batch 8
    and 0.135 ms at 64 (mobilenetv2_100, H100, bench/SPEED.md); a larger batch costs a request
    nothing when few are waiting, since a batch never waits past `max_wait_ms`."""
    if settings.max_batch_size is not None:
        return settings.max_batch_size
    return 32 if torch.device(device).type == "cuda" else 8


def serving_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("VISIONTUNE_SERVING_DEVICE=cuda, but PyTorch sees no GPU")
    return setting


def release_memory() -> None:
    """Hand an evicted model's memory back to the system: glibc keeps freed blocks in its arenas,
    so without a trim the process would stay at its high-water mark instead of the cache budget."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_image(filename: str, data: bytes, max_pixels: int, resize: int | None = None) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            if image.width * image.height > max_pixels:
                raise Invalid(
                    f"'{filename}' is {image.width}x{image.height} pixels; the limit is {max_pixels}.",
                    code="image_too_large",
                )
            return upright_rgb(image, resize)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, when the header alone is enormous
        raise Invalid(f"'{filename}' is too large to decode: {exc}", code="image_too_large") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnsupportedMedia(f"'{filename}' is not a readable image: {exc}", code="invalid_image") from exc


def preprocess(
    loaded: LoadedModel, files: list[tuple[str, bytes]], max_pixels: int, jpegs: bool = False
) -> torch.Tensor | list[EncodedJpeg]:
    """The images' pixels; or with `jpegs` (`VISIONTUNE_SERVING_DECODE=device`), the images
    themselves when they are all JPEGs that the model's micro-batcher can decode where it runs."""
    if jpegs and loaded.decode_steps is not None and all(device_decode.plain_jpeg(d, max_pixels) for _, d in files):
        return [EncodedJpeg(data) for _, data in files]
    return torch.stack(
        [loaded.transform(decode_image(name, data, max_pixels, loaded.resize)) for name, data in files]
    )


async def predict(
    loaded: LoadedModel, images: torch.Tensor | list[EncodedJpeg], top_k: int, threshold: float | None
) -> tuple[list[list[tuple[str, float]] | None], int]:
    """Top-k (label, calibrated probability) per image, None where the best is below threshold;
    and the size of the forward pass that served them."""
    probabilities, batch_size = await loaded.submit(images)
    metrics.PREDICTED_IMAGES.labels(loaded.runtime).inc(len(images))
    if isinstance(images, list):
        metrics.DEVICE_DECODED_IMAGES.inc(len(images))
    metrics.BATCH_SIZE.observe(batch_size)  # the forward pass that served this request
    scores, indices = probabilities.topk(top_k, dim=1)
    results: list[list[tuple[str, float]] | None] = []
    for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True):
        if threshold is not None and row_scores[0] < threshold:
            results.append(None)  # abstain: not confident enough
        else:
            results.append([(loaded.labels[i], s) for s, i in zip(row_scores, row_indices, strict=True)])
    return results, batch_size
