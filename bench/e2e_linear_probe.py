"""Seconds from upload to a served model, and the validation accuracy, for a `linear_probe` of
mobilenetv2_100 on hymenoptera, through the real service: `visiontune up` (API + Celery worker on
the embedded broker, or on Redis with --broker redis://...), real HTTP, real weights, default
settings ("strategy": "auto" picks the linear probe for this dataset).

    python bench/e2e_linear_probe.py [--broker URL] [--backbone mobilenetv2_100]

Prints one block of figures, and beside them the hand-written frozen-backbone baseline (the
PyTorch transfer-learning tutorial recipe with timm, bench/handwritten.py) timed in the same run.
Start-up of the processes is not counted; the clock starts when the upload starts and stops when
the first prediction from the new model comes back.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.handwritten import HYMENOPTERA, SHARED, WEIGHTS, frozen_tutorial  # noqa: E402

DATASET = HYMENOPTERA


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="", help="broker URL (default: the embedded SQLite broker)")
    parser.add_argument("--backbone", default="mobilenetv2_100")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive = root / "hymenoptera.zip"
        with zipfile.ZipFile(archive, "w") as out:
            for path in sorted(DATASET.rglob("*")):
                if path.is_file():
                    out.write(path, arcname=f"hymenoptera/{path.relative_to(DATASET)}")

        port = free_port()
        env = {**os.environ, "VISIONTUNE_DATA_DIR": str(root / "var"), "VISIONTUNE_WEIGHTS_DIR": str(SHARED / "weights")}
        if args.broker:
            env["VISIONTUNE_BROKER_URL"] = args.broker
        log = (root / "service.log").open("wb")
        service = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or service.poll() is not None:
                    sys.exit("service did not start:\n" + (root / "service.log").read_text())
                time.sleep(0.5)
            time.sleep(3)  # let the worker finish connecting

            started = time.perf_counter()
            with archive.open("rb") as file:
                dataset = http.post("/v1/datasets", files={"file": (archive.name, file)}).raise_for_status().json()
            uploaded = time.perf_counter()
            job = http.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": args.backbone}).raise_for_status().json()
            while job["status"] in ("queued", "running"):
                time.sleep(0.2)
                job = http.get(f"/v1/jobs/{job['id']}").json()
            if job["status"] != "succeeded":
                sys.exit(f"job {job['status']}: {job['error']}")
            trained = time.perf_counter()
            image = next((DATASET / "val" / "bees").iterdir())
            http.post(f"/v1/models/{job['model_id']}/predict", files={"files": (image.name, image.read_bytes())}).raise_for_status()
            served = time.perf_counter()
        finally:
            http.close()
            service.terminate()
            service.wait(timeout=60)
            log.close()

    baseline = frozen_tutorial(args.backbone) if args.backbone in WEIGHTS else None

    print(f"backbone                     {args.backbone} ({job['strategy']}, defaults: {job['hyperparameters']['epochs']} epochs)")
    print(f"broker                       {args.broker or 'embedded sqla+sqlite'}")
    print(f"dataset                      hymenoptera: {dataset['num_images']} images, {len(dataset['classes'])} classes")
    print(f"upload + ingest              {uploaded - started:6.1f} s")
    print(f"job queued -> succeeded      {trained - uploaded:6.1f} s")
    print(f"first prediction (cold)      {served - trained:6.1f} s")
    print(f"upload -> served model       {served - started:6.1f} s")
    print(f"val accuracy                 {job['metrics']['val_accuracy']:.4f} (best epoch of {job['hyperparameters']['epochs']})")
    print(f"cpu threads                  {os.cpu_count()}")
    if baseline:
        print(f"hand-written frozen baseline {baseline['seconds']:6.1f} s, val accuracy {baseline['val_accuracy']:.4f} "
              f"({baseline['epochs']} epochs, same machine, same run)")  # fmt: skip
        print(f"speed-up                     {baseline['seconds'] / (served - started):6.1f}x")


if __name__ == "__main__":
    main()
