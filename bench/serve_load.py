"""Prediction under load: 16 concurrent clients sending real hymenoptera JPEGs to a running API.

    python bench/serve_load.py [--requests 2000] [--clients 16] [--batch-sizes default,1] [--data-dir DIR]

One run prints, for a mobilenetv2_100 model trained here through the service:
- requests/s and p50/p95/p99 latency with micro-batching on (the defaults) and off;
- beside them, the raw model forward throughput at its best batch size and the batch-1 forward
  time, measured in a plain script (the same artifact loaded with timm, on the GPU when there is
  one, and its ONNX export in onnxruntime; random input tensors), and the preprocessing time;
- the most images/s that preprocessing plus forward CPU alone allow on this machine, with no HTTP;
- the CPU time the API and the load generator spend per request (VISIONTUNE_API_WORKERS=N in the
  environment runs the API in N processes);
- the same load on the PyTorch runtime, for models with an ONNX export (which the defaults serve
  through onnxruntime when it is faster);
- the API's resident memory while 5 models cycle through a cache sized for 2.
"""

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ml.backbone import load_artifact  # noqa: E402
from app.serving.predictor import ModelCache, preprocess  # noqa: E402
from bench.handwritten import HYMENOPTERA  # noqa: E402
from bench.running import cpu_seconds, progress, running, wait_for_dataset, wait_for_job, zip_hymenoptera  # noqa: E402

CORES = len(os.sched_getaffinity(0))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMAGES = [p.read_bytes() for label in ("ants", "bees") for p in sorted((HYMENOPTERA / "val" / label).iterdir())]


async def load(url: str, headers: httpx.Headers, model_id: str, requests: int, clients: int, server_pid: int) -> dict:
    counter = itertools.count()
    latencies: list[float] = []
    failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while (i := next(counter)) < requests:
            started = time.perf_counter()
            response = await http.post(f"/v1/models/{model_id}/predict", files={"files": ("x.jpg", IMAGES[i % len(IMAGES)])})
            latencies.append(time.perf_counter() - started)
            failures += response.status_code != 200

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        started, server_cpu, own_cpu = time.perf_counter(), cpu_seconds(server_pid), time.process_time()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
        server_cpu, own_cpu = cpu_seconds(server_pid) - server_cpu, time.process_time() - own_cpu
    cuts = statistics.quantiles(latencies, n=100)
    return {"rps": requests / elapsed, "p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "failures": failures,
            "server_ms": 1000 * server_cpu / requests, "client_ms": 1000 * own_cpu / requests}  # fmt: skip


def raw_forward(forward: Callable[[torch.Tensor], object]) -> tuple[dict[int, float], dict[int, float]]:
    """Images/s of a plain forward pass per batch size, and the CPU milliseconds per image it took
    (all threads)."""
    rates, cpu_ms = {}, {}
    with torch.inference_mode():
        for batch_size in (1, 4, 8, 16, 32):
            x = torch.rand(batch_size, 3, 224, 224)
            forward(x)
            repeats = max(3, 64 // batch_size)
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                forward(x)
            rates[batch_size] = batch_size * repeats / (time.perf_counter() - started)
            cpu_ms[batch_size] = 1000 * (time.process_time() - cpu_started) / (batch_size * repeats)
    return rates, cpu_ms


def preprocess_ms(artifact: Path) -> float:
    """Milliseconds per image of what the API does before the forward pass (decode, EXIF, resize,
    crop, to tensor), in a plain script on one thread, over the same JPEGs the clients send."""
    loaded = ModelCache(10**12, 1, 0, "torch").get("bench", artifact, {})  # as the API loads it
    started = time.perf_counter()
    for data in IMAGES:
        preprocess(loaded, [("x.jpg", data)], 10**9)  # the API's own function
    return 1000 * (time.perf_counter() - started) / len(IMAGES)


def torch_forward(artifact: Path, memory_format: torch.memory_format) -> Callable[[torch.Tensor], object]:
    """On the device the API serves PyTorch on (the GPU when there is one), with the same copies
    in and out as the API makes."""
    model = load_artifact(artifact).eval().to(DEVICE, memory_format=memory_format)
    return lambda x: model(x.to(DEVICE).contiguous(memory_format=memory_format)).cpu()


def onnxruntime_forward(onnx_file: Path) -> Callable[[torch.Tensor], object]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as the API runs it
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"pixels": x.numpy()})


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def five_models(data_dir: Path) -> list[str]:
    """Five small models trained through the service (to cycle through the cache), the first with
    an ONNX export; listed in `bench-models.json`, so that a kept data directory is reused."""
    listing = data_dir / "bench-models.json"
    if listing.exists():
        return json.loads(listing.read_text())
    progress("training five models through the service")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    archive = zip_hymenoptera(data_dir.parent / "small.zip", per_class=10)
    with running("up", data_dir) as (_, http):
        with archive.open("rb") as file:
            dataset = http.post("/v1/datasets", files={"file": (archive.name, file)}).raise_for_status().json()
        dataset = wait_for_dataset(http, dataset)
        jobs = [http.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100", "seed": seed})
                .raise_for_status().json() for seed in range(5)]  # fmt: skip
        models = [wait_for_job(http, job)["model_id"] for job in jobs]
        http.post(f"/v1/models/{models[0]}/exports", json={"format": "onnx"}).raise_for_status()
        while http.get(f"/v1/models/{models[0]}/exports/onnx").json()["status"] == "processing":  # a worker builds it
            time.sleep(0.5)
    listing.write_text(json.dumps(models))
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch-sizes", default="default,1", help="max_batch_size values to load-test; 1 = off")
    parser.add_argument("--data-dir", type=Path, help="the service's data directory, kept; reused when it holds the models")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "var"
        models = five_models(data_dir)

        progress("raw forward passes")
        artifact = data_dir / "models" / models[0]
        raw = {
            "PyTorch, default layout": raw_forward(torch_forward(artifact, torch.contiguous_format)),
            "PyTorch, channels_last": raw_forward(torch_forward(artifact, torch.channels_last)),  # as the API runs it
            "onnxruntime": raw_forward(onnxruntime_forward(data_dir / "exports" / models[0] / "model.onnx")),
        }
        preprocessing = preprocess_ms(artifact)
        print(f"preprocessing in a plain script (decode, EXIF, resize, crop, to tensor; one thread): "
              f"{preprocessing:.1f} ms/img")  # fmt: skip
        for name, (table, cpu_ms) in raw.items():
            best = max(table, key=table.get)
            where = torch.cuda.get_device_name() if DEVICE == "cuda" and name.startswith("PyTorch") else f"CPU, {torch.get_num_threads()} threads"
            print(f"raw forward, {name} (plain script, mobilenetv2_100, {where}): "
                  + ", ".join(f"batch {b}: {r:.1f}" for b, r in table.items())
                  + f" img/s; best {table[best]:.1f} img/s at batch {best}; batch-1 forward {1000 / table[1]:.1f} ms")  # fmt: skip
            # What no HTTP server can beat on this machine: each request needs its image preprocessed
            # and its forward pass, and these CPU costs alone share the cores.
            floor_ms = preprocessing + cpu_ms[best]
            print(f"  CPU per image, preprocessing {preprocessing:.1f} ms + forward {cpu_ms[best]:.1f} ms at batch {best}: "
                  f"with no HTTP at all, at most {1000 * CORES / floor_ms:.0f} img/s on {CORES} cores "
                  f"({1000 * CORES / floor_ms / table[best]:.2f}x raw)")  # fmt: skip
        print(f"{args.requests} requests, {args.clients} concurrent clients, one JPEG each; ratios against the raw "
              f"figures of the runtime that served", flush=True)  # fmt: skip
        for value in args.batch_sizes.split(","):
            for runtime in ("auto", "torch"):
                name = "defaults (batching on)" if value == "default" else ("batching off" if value == "1" else f"max_batch_size {value}")
                settings = ({} if value == "default" else {"max_batch_size": value}) | ({} if runtime == "auto" else {"serving_runtime": runtime})
                progress(f"load: {name}, runtime {runtime}")
                with running("serve", data_dir, **settings) as (service, http):
                    served_by = http.post(f"/v1/models/{models[0]}/predict", files={"files": ("x.jpg", IMAGES[0])}).headers["X-Runtime"]
                    r = asyncio.run(load(str(http.base_url), http.headers, models[0], args.requests, args.clients, service.pid))
                table, _ = raw["PyTorch, channels_last" if served_by == "torch" else "onnxruntime"]
                best, batch1 = max(table.values()), 1 / table[1]
                print(f"  {name + ', ' + served_by:36s} {r['rps']:6.1f} req/s ({r['rps'] / best:.2f}x raw)  "
                      f"p50 {r['p50'] * 1000:6.1f} ms  p95 {r['p95'] * 1000:6.1f} ms  p99 {r['p99'] * 1000:6.1f} ms "
                      f"({r['p99'] / batch1:.1f}x batch-1 forward)  failed {r['failures']}")  # fmt: skip
                print(f"  {'':36s} CPU per request: API {r['server_ms']:.1f} ms, load generator {r['client_ms']:.1f} ms "
                      f"(on {CORES} cores: at most {1000 * CORES / (r['server_ms'] + r['client_ms']):.0f} req/s)", flush=True)  # fmt: skip

        model_bytes = sum(t.numel() * t.element_size() for t in load_artifact(data_dir / "models" / models[0]).state_dict().values())
        with running("serve", data_dir, model_cache_bytes=str(int(2.5 * model_bytes))) as (service, http):
            samples = []
            for model_id in models[:2] * 5:
                http.post(f"/v1/models/{model_id}/predict", files={"files": ("x.jpg", IMAGES[0])}).raise_for_status()
            two_models = rss_bytes(service.pid)
            for model_id in models * 10:
                http.post(f"/v1/models/{model_id}/predict", files={"files": ("x.jpg", IMAGES[0])}).raise_for_status()
                samples.append(rss_bytes(service.pid))

    print(f"model cache sized for 2 models ({2.5 * model_bytes / 2**20:.0f} MiB), 5 models cycled 10 times: "
          f"API RSS with 2 models {two_models / 2**20:.0f} MiB, peak while cycling {max(samples) / 2**20:.0f} MiB, "
          f"last {samples[-1] / 2**20:.0f} MiB (one model is {model_bytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
