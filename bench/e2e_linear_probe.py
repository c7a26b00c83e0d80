"""Seconds from upload to a served model, and the validation accuracy, for a `linear_probe` of
mobilenetv2_100 on hymenoptera, through the real service: `visiontune up` (API + Celery worker on
the embedded broker, or on Redis with --broker redis://...), real HTTP, real weights, default
settings ("strategy": "auto" picks the linear probe for this dataset).

    python bench/e2e_linear_probe.py [--broker URL] [--backbone mobilenetv2_100] [--strategy linear_probe]
                                     [--repeat N] [--distributed]

With --repeat N, N runs and their median upload -> served time (timings on a shared machine are
noisy). With --distributed, each run is made again on PostgreSQL, Redis and an S3 store (moto's
server, all on 127.0.0.1), and the median ratio of the two upload -> served times is printed.

Prints one block of figures, and beside them the hand-written frozen-backbone baseline (the
PyTorch transfer-learning tutorial recipe with timm, bench/handwritten.py) timed in the same run.
Start-up of the processes is not counted; the clock starts when the upload starts and stops when
the first prediction from the job's first model comes back. With `auto` that is the requested
backbone's linear probe, served while the search goes on; the time until the job succeeds (with
the search's winner) is printed beside it.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.handwritten import HYMENOPTERA, WEIGHTS, frozen_tutorial  # noqa: E402
from bench.running import distributed_backends, progress, running, wait_for_dataset, wait_for_job, zip_hymenoptera  # noqa: E402


def upload_to_served(root: Path, archive: Path, backbone: str, strategy: str | None, environment: dict[str, str],
                     **settings) -> dict:  # fmt: skip
    """One run through the real service: seconds of each step, the model served first and the job.
    With `auto`, the first model is the requested backbone's probe, served while the search goes on."""
    with running("up", root / "var", environment, **settings) as (_, http):
        started = time.perf_counter()
        with archive.open("rb") as file:
            dataset = http.post("/v1/datasets", files={"file": (archive.name, file)}).raise_for_status().json()
        dataset = wait_for_dataset(http, dataset, poll=0.05)
        uploaded = time.perf_counter()
        request = {"dataset_id": dataset["id"], "backbone": backbone} | ({"strategy": strategy} if strategy else {})
        job = http.post("/v1/jobs", json=request).raise_for_status().json()
        while job["model_id"] is None and job["status"] in ("queued", "running"):
            time.sleep(0.05)
            job = http.get(f"/v1/jobs/{job['id']}").json()
        if job["model_id"] is None:
            sys.exit(f"job {job['status']}: {job['error']}")
        trained = time.perf_counter()
        image = next((HYMENOPTERA / "val" / "bees").iterdir())
        http.post(f"/v1/models/{job['model_id']}/predict", files={"files": (image.name, image.read_bytes())}).raise_for_status()
        served = time.perf_counter()
        model = http.get(f"/v1/models/{job['model_id']}").raise_for_status().json()
        job = wait_for_job(http, job)
        finished = time.perf_counter()
    return {"dataset": dataset, "job": job, "model": model, "ingest": uploaded - started, "train": trained - uploaded,
            "predict": served - trained, "total": served - started, "finished": finished - started}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="", help="broker URL (default: the embedded SQLite broker)")
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--strategy", help="ask for this strategy (default: the server's, auto)")
    parser.add_argument("--distributed", action="store_true",
                        help="also run on PostgreSQL, Redis and an S3 store (moto's server), and compare")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs (with --distributed: pairs of runs); the median upload -> served is printed")  # fmt: skip
    args = parser.parse_args()

    settings = {"broker_url": args.broker} if args.broker else {}
    runs, ratios, served = {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive = zip_hymenoptera(root / "hymenoptera.zip")
        for attempt in range(args.repeat):
            runs[args.broker or "embedded (SQLite, sqla+sqlite broker, local files)"] = upload_to_served(
                root / f"embedded-{attempt}", archive, args.backbone, args.strategy, {}, **settings)  # fmt: skip
            run = next(iter(runs.values()))
            served.append(run["total"])
            progress(f"run {attempt + 1}: upload + ingest {run['ingest']:.1f} s, job -> served {run['train']:.1f} s, "
                     f"first prediction {run['predict']:.1f} s, upload -> served {run['total']:.1f} s")  # fmt: skip
            if args.distributed:
                with distributed_backends(root) as environment:
                    runs["PostgreSQL + Redis + S3 (moto)"] = upload_to_served(
                        root / f"distributed-{attempt}", archive, args.backbone, args.strategy, environment)  # fmt: skip
                embedded, distributed = runs.values()
                ratios.append(distributed["total"] / embedded["total"])

    baseline = frozen_tutorial(args.backbone) if args.backbone in WEIGHTS else None
    first = next(iter(runs.values()))
    job, dataset = first["job"], first["dataset"]
    print(f"backbone                     {args.backbone} ({job['strategy']}, defaults: {job['hyperparameters']['epochs']} epochs)")
    print(f"dataset                      hymenoptera: {dataset['num_images']} images, {len(dataset['classes'])} classes")
    for name, run in runs.items():
        print(f"--- {name}")
        print(f"upload + ingest              {run['ingest']:6.1f} s")
        model = run["model"]
        print(f"job queued -> model served   {run['train']:6.1f} s")
        print(f"first prediction (cold)      {run['predict']:6.1f} s")
        print(f"upload -> served model       {run['total']:6.1f} s ({model['strategy']} of {model['backbone']}, "
              f"val accuracy {model['metrics']['val_accuracy']:.4f})")  # fmt: skip
        print(f"upload -> job succeeded      {run['finished']:6.1f} s ({run['job']['strategy']} of {run['job']['backbone']}, "
              f"val accuracy {run['job']['metrics']['val_accuracy']:.4f})")  # fmt: skip
    if len(served) > 1:
        print(f"upload -> served, median     {statistics.median(served):6.1f} s (of {', '.join(f'{t:.1f}' for t in served)}; "
              "figures above: the last run)")  # fmt: skip
    if ratios:
        print(f"distributed / embedded       {statistics.median(ratios):6.2f}x upload -> served (median of "
              f"{', '.join(f'{ratio:.2f}' for ratio in ratios)}; figures above: the last pair)")  # fmt: skip
    print(f"cpu threads                  {os.cpu_count()}")
    if baseline:
        print(f"hand-written frozen baseline {baseline['seconds']:6.1f} s, val accuracy {baseline['val_accuracy']:.4f} "
              f"({baseline['epochs']} epochs, same machine, same run)")  # fmt: skip
        print(f"speed-up                     {baseline['seconds'] / first['total']:6.1f}x")


if __name__ == "__main__":
    main()
