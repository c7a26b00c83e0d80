"""Serving throughput against its no-HTTP floor, with the load from wrk (C, a few threads: it takes
far less CPU per request than the server, unlike a Python load generator).

    python bench/serve_wrk.py [--data-dir DIR] [--api-workers 1] [--clients 16] [--seconds 20]
                              [--bodies raw,multipart] [--runtimes auto,torch,onnxruntime,onnxruntime-int8]
                              [--images DIR] [--inference-process auto,off,on] [--decode auto,api,device]
                              [--max-batch-sizes default,8]

One run prints, for a mobilenetv2_100 model trained here through the service (kept in --data-dir):
- the no-HTTP floor of each runtime: images/s of the API's own decode -> preprocess -> forward
  functions in a plain script, decoding on one thread per core and forwarding batches of the
  default `max_batch_size` as the API's micro-batcher does, on the same cores;
- for each runtime, API process count, inference process setting (`on`: the API processes decode
  and send their pixels to one inference process per GPU, or one on the CPU), decode setting
  (`device`: JPEGs are decoded in batches where the model runs, nvjpeg on a GPU), largest batch
  and body kind (`raw`: one JPEG as the body, `Content-Type: image/jpeg`; `multipart`: the field
  `files`), wrk's requests/s with `--clients` connections, its p50/p90/p99 latency and failures,
  the ratio to the floor, and the CPU milliseconds per request of the API (and of its inference
  process, and of that process's event loop: one thread for all API processes' requests) and of wrk.
Needs `wrk` on the PATH (Debian: apt-get install wrk).
"""

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.config import Settings  # noqa: E402
from app.models.service import EXPORT_FORMATS, export_key  # noqa: E402
from app.serving.predictor import ModelCache, max_batch_size, preprocess, serving_device  # noqa: E402
from bench.handwritten import HYMENOPTERA  # noqa: E402
from bench.running import cpu_seconds, progress, running, wait_for_dataset, wait_for_job, zip_hymenoptera  # noqa: E402

CORES = len(os.sched_getaffinity(0))
BOUNDARY = "visiontune-bench-boundary"
# wrk's Lua side: every connection cycles through the images, each request one image.
WRK_SCRIPT = r"""
local bodies, next_body = {}, 0
local raw = os.getenv("BENCH_BODY") == "raw"
for path in io.lines(os.getenv("BENCH_IMAGE_LIST")) do
  local file = assert(io.open(path, "rb"))
  local data = file:read("*a")
  file:close()
  if raw then
    table.insert(bodies, data)
  else
    table.insert(bodies, "--" .. os.getenv("BENCH_BOUNDARY") .. "\r\n" ..
      'Content-Disposition: form-data; name="files"; filename="image.jpg"\r\n' ..
      "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. os.getenv("BENCH_BOUNDARY") .. "--\r\n")
  end
end
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
wrk.headers["Content-Type"] = raw and "image/jpeg" or ("multipart/form-data; boundary=" .. os.getenv("BENCH_BOUNDARY"))

function init(args)
  next_body = math.random(#bodies)  -- threads start at different images
end

function request()
  next_body = next_body % #bodies + 1
  return wrk.format(nil, os.getenv("BENCH_PATH"), nil, bodies[next_body])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "seconds": %.3f, "p50": %.3f, "p90": %.3f, "p99": %.3f, ' ..
    '"non_2xx": %d, "socket_errors": %d}\n', summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(90) / 1e3, latency:percentile(99) / 1e3, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def trained_model(data_dir: Path, formats: list[str]) -> str:
    """One model trained through the service, with the ONNX exports of `formats` (an int8 one only
    where it passes its gate); the model and its exports are reused from `data_dir`."""
    listing = data_dir / "bench-model.json"
    model_id = json.loads(listing.read_text()) if listing.exists() else None
    missing = [f for f in formats if model_id is None or not (data_dir / export_key(model_id, f) / "model.onnx").exists()]
    if model_id is not None and not missing:
        return model_id
    data_dir.mkdir(parents=True, exist_ok=True)
    with running("up", data_dir) as (_, http):
        if model_id is None:
            progress("training a model through the service")
            archive = zip_hymenoptera(data_dir.parent / "small.zip", per_class=20)
            with archive.open("rb") as file:
                dataset = http.post("/v1/datasets", files={"file": (archive.name, file)}).raise_for_status().json()
            dataset = wait_for_dataset(http, dataset)
            job = http.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100"}).raise_for_status()
            model_id = wait_for_job(http, job.json())["model_id"]
            listing.write_text(json.dumps(model_id))
        for format in missing:
            http.post(f"/v1/models/{model_id}/exports", json={"format": format}).raise_for_status()
            while (export := http.get(f"/v1/models/{model_id}/exports/{format}").json())["status"] == "processing":
                time.sleep(0.5)  # a worker builds it
            print(f"{format} export {export['status']}: {json.dumps(export['parity'])}", flush=True)
    return model_id


def floor(data_dir: Path, model_id: str, runtime: str, images: list[bytes]) -> tuple[float, str, int]:
    """Images/s of the API's decode -> preprocess -> forward with no HTTP, the runtime that ran, and
    the batch size (the API's default)."""
    settings = Settings(data_dir=data_dir)
    device = serving_device(settings.serving_device)
    batch = max_batch_size(settings, device)
    cache = ModelCache(10**12, batch, 0, runtime, device, settings.serving_cuda_graphs)
    exports = {f: data_dir / export_key(model_id, f) / "model.onnx" for f in EXPORT_FORMATS}
    loaded = cache.get(model_id, data_dir / "models" / model_id, {f: path for f, path in exports.items() if path.exists()})
    work = images * max(1, 600 // len(images))

    def decoded(data: bytes) -> torch.Tensor:
        return preprocess(loaded, [("image.jpg", data)], settings.max_image_pixels)

    with ThreadPoolExecutor(CORES) as pool:
        for pixels in pool.map(decoded, images[:batch]):  # warm-up
            loaded.probabilities(pixels)
        started = time.perf_counter()
        pending = []
        for pixels in pool.map(decoded, work):  # decoding runs ahead on the pool's threads
            pending.append(pixels)
            if len(pending) == batch:
                loaded.probabilities(torch.cat(pending))
                pending = []
        if pending:
            loaded.probabilities(torch.cat(pending))
        return len(work) / (time.perf_counter() - started), loaded.runtime, batch


def wrk(base_url: str, path: str, key: str, body: str, image_list: Path, clients: int, seconds: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT)
        script.flush()
        env = {**os.environ, "BENCH_BODY": body, "BENCH_IMAGE_LIST": str(image_list), "BENCH_KEY": key,
               "BENCH_BOUNDARY": BOUNDARY, "BENCH_PATH": path}  # fmt: skip
        threads = max(1, min(clients, CORES // 4))
        argv = [shutil.which("wrk"), "-t", str(threads), "-c", str(clients), "-d", f"{seconds}s", "--timeout", "30s",
                "-s", script.name, base_url]  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.strip().splitlines()[-1])
    result["cpu_seconds"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def inference_processes(pid: int) -> list[int]:
    """The inference processes among the children of `visiontune serve`."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"app.serving.inference_process" in Path(f"/proc/{c}/cmdline").read_bytes()]


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def event_loop_cpu(pids: list[int]) -> float:
    """CPU seconds of the inference processes' main threads, where their event loops run (reading
    and answering every API process's requests); their forward passes and decoding run in others."""
    seconds = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        seconds += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="the service's data directory, kept; reused when it holds the model")
    parser.add_argument("--api-workers", default="1", help="comma-separated API process counts to load-test")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="seconds of load before measuring: every API process loads the model")
    parser.add_argument("--bodies", default="raw,multipart")
    parser.add_argument("--runtimes", default="auto,torch", help="VISIONTUNE_SERVING_RUNTIME values")
    parser.add_argument("--images", type=Path, default=HYMENOPTERA / "val", help="a folder of JPEGs (searched recursively)")
    parser.add_argument("--inference-process", default="auto",
                        help="comma-separated VISIONTUNE_SERVING_INFERENCE_PROCESS values (auto: on when serving on a GPU)")
    parser.add_argument("--decode", default="auto", help="comma-separated VISIONTUNE_SERVING_DECODE values")
    parser.add_argument("--max-batch-sizes", default="default",
                        help="comma-separated VISIONTUNE_MAX_BATCH_SIZE values (default: unset, 8 on a CPU, 32 on a GPU)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not on the PATH (Debian: apt-get install wrk)")
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    images = [p.read_bytes() for p in paths]

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "var"
        runtimes = args.runtimes.split(",")
        model_id = trained_model(data_dir, [] if runtimes == ["torch"] else list(EXPORT_FORMATS))  # torch needs none
        image_list = Path(tmp) / "images.txt"
        image_list.write_text("".join(f"{p.resolve()}\n" for p in paths))
        device = serving_device("auto")
        where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        print(f"{len(images)} JPEGs from {args.images}; {CORES} cores; {where}; wrk with {args.clients} connections, "
              f"{args.seconds} s per row", flush=True)  # fmt: skip
        for runtime in runtimes:
            progress(f"no-HTTP floor, runtime {runtime}")
            rate, ran, default_batch = floor(data_dir, model_id, runtime, images)
            print(f"runtime {runtime} ({ran}): no-HTTP floor {rate:.1f} img/s (decode on {CORES} threads, forward in "
                  f"batches of {default_batch})", flush=True)  # fmt: skip
            configs = itertools.product(args.api_workers.split(","), args.inference_process.split(","),
                                        args.decode.split(","), args.max_batch_sizes.split(","))  # fmt: skip
            for workers, inference, decode, batch in configs:
                batching = {} if batch == "default" else {"max_batch_size": batch}
                with running("serve", data_dir, serving_runtime=runtime, api_workers=workers,
                             serving_inference_process=inference, serving_decode=decode, **batching) as (service, http):  # fmt: skip
                    key = http.headers["Authorization"].split()[1]
                    target = (str(http.base_url).rstrip("/"), f"/v1/models/{model_id}/predict")
                    wrk(*target, key, "raw", image_list, args.clients, args.warmup)
                    for body in args.bodies.split(","):
                        progress(f"wrk: runtime {runtime}, {workers} API process(es), inference process {inference}, "
                                 f"decode {decode}, max batch {batch}, {body} body")
                        inference_pids = inference_processes(service.pid)
                        server_cpu, inference_cpu = cpu_seconds(service.pid), cpu_of(inference_pids)
                        loop_cpu = event_loop_cpu(inference_pids)
                        r = wrk(*target, key, body, image_list, args.clients, args.seconds)
                        server_cpu, inference_cpu = cpu_seconds(service.pid) - server_cpu, cpu_of(inference_pids) - inference_cpu
                        loop_cpu = event_loop_cpu(inference_pids) - loop_cpu
                        rps = r["requests"] / r["seconds"]
                        print(f"  {workers} API process(es), inference process {inference:4s}, decode {decode:6s}, "
                              f"max batch {batch if batch != 'default' else default_batch}, {body:9s} "
                              f"{rps:7.1f} req/s ({rps / rate:.2f}x floor)  "
                              f"p50 {r['p50']:6.1f} ms  p90 {r['p90']:6.1f} ms  p99 {r['p99']:6.1f} ms  "
                              f"non-2xx {r['non_2xx']}  socket errors {r['socket_errors']}  CPU per request: "
                              f"API {1000 * server_cpu / r['requests']:.2f} ms (inference process "
                              f"{1000 * inference_cpu / r['requests']:.2f} ms of it, its event loop {1000 * loop_cpu / r['requests']:.2f} ms), wrk {1000 * r['cpu_seconds'] / r['requests']:.2f} ms",
                              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
