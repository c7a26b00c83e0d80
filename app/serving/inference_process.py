"""The inference process: one per GPU, running the forward passes of every API process of
`visiontune serve` (`VISIONTUNE_SERVING_INFERENCE_PROCESS`; on by default when serving on a GPU).

Why: with the forward pass inside each API process, N processes mean N CUDA contexts time-slicing
one GPU, N micro-batchers each seeing only 1/N of the requests, and N threads spinning while they
wait for their copies back (bench/SPEED.md, "The GPU path": 845 req/s at 15 processes, p99 in
seconds). Here the API processes read, decode and preprocess, and send uint8 pixels over a Unix
socket; this process holds the models (the same `ModelCache`, CUDA graphs and micro-batcher as an
API process has without it), so the requests of all of them share batches and one CUDA context.

The protocol, one request at a time per connection (the API process keeps a pool of them,
`app.serving.remote`): a frame is two big-endian uint32 lengths, a JSON header, and a payload.
Requests: `{"op": "load" | "predict" | "embed", "model_id", "directory", "exports", "shape"}`
with uint8 pixels as the payload; a predict with `"jpegs": [length, ...]` in place of `"shape"`
has JPEG files end to end as its payload, for the model's micro-batcher to decode here
(`VISIONTUNE_SERVING_DECODE=device`); or `{"op": "evict", "model_id"}`. Answers: `{"runtime",
"batch_size", "shape"}` with float32 rows as the payload, or `{"error": message, "code"}` (the
code `device_undecodable` when a JPEG would not decode here: the API process decodes it instead).
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from app.core import logs
from app.core.config import Settings, get_settings
from app.serving import predictor
from app.serving.device_decode import DeviceUndecodable, EncodedJpeg
from app.serving.predictor import LoadedModel, ModelCache

logger = logging.getLogger(__name__)

_LENGTHS = struct.Struct("!II")
_BUFFER_LIMIT = 64 * 2**20


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict, bytes]:
    header_size, payload_size = _LENGTHS.unpack(await reader.readexactly(_LENGTHS.size))
    header = json.loads(await reader.readexactly(header_size))
    return header, await reader.readexactly(payload_size) if payload_size else b""


async def write_frame(writer: asyncio.StreamWriter, header: dict, payload: bytes | memoryview = b"") -> None:
    encoded, payload = json.dumps(header).encode(), memoryview(payload).cast("B")  # (bytes, however many dimensions)
    writer.write(_LENGTHS.pack(len(encoded), len(payload)) + encoded)
    if payload:
        writer.write(payload)
    await writer.drain()


class InferenceServer:
    def __init__(self, settings: Settings):
        self.cache = ModelCache.from_settings(settings)

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    header, payload = await read_frame(reader)
                except asyncio.IncompleteReadError:
                    return  # the API process closed it
                try:
                    answer, rows = await self.answer(header, payload)
                except DeviceUndecodable as exc:  # a client's file, not a fault here
                    await write_frame(writer, {"error": str(exc), "code": exc.code})
                    continue
                except Exception as exc:  # the API process turns it into its error answer; this process goes on
                    logger.exception("inference request failed: %s", header.get("op"))
                    await write_frame(writer, {"error": f"{type(exc).__name__}: {exc}"})
                    continue
                if rows is None:
                    await write_frame(writer, answer)
                else:
                    rows = np.ascontiguousarray(rows, dtype=np.float32)
                    await write_frame(writer, {**answer, "shape": list(rows.shape)}, rows.data)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def answer(self, header: dict, payload: bytes) -> tuple[dict, np.ndarray | None]:
        if header["op"] == "evict":
            self.cache.evict(header["model_id"])
            return {}, None
        loaded = await self.model(header)
        if header["op"] == "load":
            return {"runtime": loaded.runtime}, None
        if "jpegs" in header:  # (predictions only) the model's micro-batcher decodes them
            view, ends = memoryview(payload), itertools.accumulate(header["jpegs"])
            images = [EncodedJpeg(view[end - size : end]) for size, end in zip(header["jpegs"], ends, strict=True)]
        else:
            # uint8 pixels. They stay uint8 through the batcher, and are scaled to the [0, 1] pixels the
            # API process would have computed itself only where the forward pass runs: on a GPU, by
            # the GPU. (A copy: a tensor over the immutable payload could not be written.)
            images = torch.frombuffer(bytearray(payload), dtype=torch.uint8).reshape(header["shape"])
        if header["op"] == "predict":
            probabilities, batch_size = await loaded.submit(images)
            return {"runtime": loaded.runtime, "batch_size": batch_size}, probabilities.numpy()
        if header["op"] == "embed":
            return {"runtime": loaded.runtime}, (await loaded.embed(images)).numpy()
        raise ValueError(f"unknown op {header['op']!r}")

    async def model(self, header: dict) -> LoadedModel:
        """The model, loaded on first use; loaded again when the API process names an export it was
        loaded without (one finished since: `auto` then times it against the others)."""
        model_id = header["model_id"]
        loaded = self.cache.cached(model_id)
        if loaded is not None and header["exports"].keys() - loaded.exports_seen:
            self.cache.evict(model_id)
            loaded = None
        if loaded is None:
            exports = {name: Path(path) for name, path in header["exports"].items()}
            loaded = await asyncio.to_thread(self.cache.get, model_id, Path(header["directory"]), exports)
        return loaded


async def serve(socket_path: str, settings: Settings) -> None:
    server = InferenceServer(settings)
    Path(socket_path).unlink(missing_ok=True)
    parent = os.getppid()
    # asyncio pauses a connection's reading while its buffer holds over twice `limit`: at the default
    # (64 KiB) every JPEG-sized payload paused and resumed it mid-read, an epoll change each way. A
    # request is read whole in any case (`read_frame`), and only API processes connect.
    async with await asyncio.start_unix_server(server.connection, path=socket_path, limit=_BUFFER_LIMIT):
        logger.info("inference process %d serving on %s (%s)", os.getpid(), socket_path, server.cache.device)
        while os.getppid() == parent:  # `visiontune serve` is gone (even if killed): so is this process
            await asyncio.sleep(1)


class InferenceProcesses:
    """The inference processes `visiontune serve` runs beside its API processes: one per visible
    GPU (each seeing only its own), or one when serving on the CPU. Each is started again if it
    ends; meanwhile the API answers 503 with Retry-After."""

    def __init__(self, devices: list[str | None]):
        self._directory = tempfile.mkdtemp(prefix="visiontune-")  # short: a socket path is at most 107 bytes
        self.sockets = [os.path.join(self._directory, f"inference-{i}.sock") for i in range(len(devices))]
        self._devices = devices
        self._children: list[subprocess.Popen] = [self._start(i) for i in range(len(devices))]
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._restart_ended, name="inference-watcher", daemon=True)
        self._watcher.start()

    def _start(self, index: int) -> subprocess.Popen:
        env = dict(os.environ)
        if self._devices[index] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self._devices[index]
        return subprocess.Popen([sys.executable, "-m", "app.serving.inference_process", self.sockets[index]], env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        for path, child in zip(self.sockets, self._children, strict=True):
            while not _answers(path):
                if child.poll() is not None:
                    raise RuntimeError(f"the inference process for {path} exited with {child.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the inference process for {path} did not start within {timeout:g} s")
                time.sleep(0.1)

    def _restart_ended(self) -> None:
        while not self._stopping.wait(0.5):
            for index, child in enumerate(self._children):
                if child.poll() is not None and not self._stopping.is_set():
                    logger.warning("inference process %d exited with %s; starting it again", child.pid, child.returncode)
                    self._children[index] = self._start(index)

    def stop(self) -> None:
        self._stopping.set()
        self._watcher.join()
        for child in self._children:
            child.terminate()
        for child in self._children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        with contextlib.suppress(OSError):
            for path in self.sockets:
                Path(path).unlink(missing_ok=True)
            os.rmdir(self._directory)


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def inference_devices(settings: Settings) -> list[str | None] | None:
    """One entry per inference process to run (the CUDA_VISIBLE_DEVICES of each; None on the CPU),
    or None when forward passes stay in the API processes."""
    if settings.serving_inference_process == "off":
        return None
    device = predictor.serving_device(settings.serving_device)
    if device == "cpu":
        return [None] if settings.serving_inference_process == "on" else None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def inference_processes(devices: list[str | None] | None) -> Iterator[list[str]]:
    """The sockets of the running inference processes (none when they are off); stopped on exit."""
    if not devices:
        yield []
        return
    processes = InferenceProcesses(devices)
    try:
        processes.wait_ready()
        yield processes.sockets
    finally:
        processes.stop()


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: this process is stopped by `visiontune
    # serve` once its API processes are done, not in the middle of their last requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket", help="the Unix socket to listen on")
    args = parser.parse_args()
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logs.configure(settings.log_format)
    asyncio.run(serve(args.socket, settings))


if __name__ == "__main__":
    main()
