"""End to end on the production shape: a real redis-server, a real `celery worker` process and a
real uvicorn process, with real pretrained weights and the real hymenoptera photos."""

import base64
import json
import os
import signal
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from app.core.broker import FINETUNE_TASK, make_celery
from app.core.config import Settings
from tests.conftest import HYMENOPTERA, Process, free_port, is_ready, start_stack, wait_until
from tests.jobs.test_streams import read_sse
from tests.security.hostile_images import (
    gif_header,
    image_bytes,
    png_header,
    tiff_header,
)
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    stack = start_stack(tmp_path_factory, redis_url, VISIONTUNE_WORKER_METRICS_PORT=str(free_port()),
                        VISIONTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES="true")  # the receiver is on 127.0.0.1
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def webhook(stack, receiver) -> dict:
    response = stack.http.post("/v1/webhooks", json={"url": receiver.url, "events": ["dataset.ready", "job.succeeded"]})
    assert response.status_code == 201, response.text
    return response.json()


def create_job(stack, dataset_id: str, **fields) -> dict:
    response = stack.http.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100", **fields})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    return response.json()


def events(stack, job_id: str) -> list[dict]:
    return stack.http.get(f"/v1/jobs/{job_id}/events").json()["data"]


def val_images(per_class: int) -> list[tuple[Path, str]]:
    return [
        (path, label)
        for label in ("ants", "bees")
        for path in sorted((HYMENOPTERA / "val" / label).iterdir())[:per_class]
    ]


@pytest.fixture(scope="module")
def probe_run(stack, hymenoptera_zip, webhook) -> tuple[dict, list[dict]]:
    """The linear probe on the whole of hymenoptera, followed from queued to succeeded as Server-Sent
    Events, with the connection dropped after its first epoch and resumed with Last-Event-ID."""
    dataset = stack.upload(hymenoptera_zip)
    assert dataset["classes"] == [
        {"name": "ants", "train": 124, "val": 70},
        {"name": "bees", "train": 121, "val": 83},
    ]
    job = create_job(stack, dataset["id"], strategy="linear_probe")
    url, sse = f"/v1/jobs/{job['id']}/events", {"Accept": "text/event-stream"}
    with stack.http.stream("GET", url, headers=sse) as response:
        streamed = read_sse(response, stop=lambda event: event.get("event") in ("epoch", "end"))
    last_id = [event["id"] for event in streamed if "id" in event][-1]
    with stack.http.stream("GET", url, headers=sse | {"Last-Event-ID": last_id}) as response:
        streamed += read_sse(response)
    return stack.wait_job(job["id"]), streamed


@pytest.fixture(scope="module")
def probe(probe_run) -> dict:
    return probe_run[0]


def test_a_job_streamed_from_queued_to_succeeded_resumes_after_a_dropped_connection(stack, probe_run):
    job, streamed = probe_run
    stored = events(stack, job["id"])
    # Every stored event exactly once, in order, across the two connections.
    assert [int(e["id"]) for e in streamed if "id" in e] == [e["id"] for e in stored]
    assert json.loads(streamed[0]["data"])["message"].startswith("queued")
    assert streamed[-1] == {"event": "end", "data": json.dumps({"status": "succeeded"})}
    progress = [json.loads(e["data"]) for e in streamed if e.get("event") == "progress"]
    features = [p for p in progress if p["phase"] == "features"]
    measured = [p for p in features if p["images_per_second"] and p["eta_seconds"] is not None]
    assert measured and all(p["images_per_second"] > 0 and p["steps"] >= p["step"] >= 1 for p in measured), features


def test_webhooks_are_delivered_by_the_worker_and_signed(stack, probe, receiver, webhook):
    wait_until(lambda: len(receiver.requests) >= 2, 60, "two webhook deliveries", processes=stack.processes)
    payloads = receiver.verified(webhook["secret"])  # the standardwebhooks library checks each signature
    assert sorted(p["type"] for p in payloads) == ["dataset.ready", "job.succeeded"]
    succeeded = next(p for p in payloads if p["type"] == "job.succeeded")
    assert succeeded["data"]["id"] == probe["id"] and succeeded["data"]["model_id"] == probe["model_id"]
    logged = stack.http.get(f"/v1/webhooks/{webhook['id']}/deliveries").json()["data"]
    assert {(d["status"], d["attempts"], d["log"][0]["status_code"]) for d in logged} == {("succeeded", 1, 204)}


def test_backbone_catalogue_sees_local_weights(stack):
    listing = stack.http.get("/v1/backbones", params={"search": "mobilenetv2_1"}).json()
    entry = next(b for b in listing["data"] if b["name"] == "mobilenetv2_100")
    assert entry["weights_available"] is True and entry["weights_source"] == "local"
    assert entry["num_params"] > 3_000_000 and entry["input_size"] == [3, 224, 224]


def test_linear_probe_reaches_accuracy(stack, probe):
    assert probe["status"] == "succeeded", probe
    assert probe["metrics"]["val_accuracy"] >= 0.93
    epochs = probe["hyperparameters"]["epochs"]
    assert probe["progress"] == {"epoch": epochs, "epochs": epochs, "phase": "succeeded", "step": None, "steps": None,
                                 "images_per_second": None, "eta_seconds": None, "queue_position": None}  # fmt: skip
    epoch_events = [e for e in events(stack, probe["id"]) if e["type"] == "epoch"]
    assert len(epoch_events) == probe["hyperparameters"]["epochs"]
    assert all(e["data"]["images_per_second"] > 0 and "eta_seconds" in e["data"] for e in epoch_events)

    model = stack.http.get(f"/v1/models/{probe['model_id']}").json()
    assert model["backbone"] == "mobilenetv2_100" and model["classes"] == ["ants", "bees"]
    assert model["metrics"]["val_accuracy"] == pytest.approx(max(e["data"]["val_accuracy"] for e in epoch_events))
    assert {c["label"] for c in model["metrics"]["per_class"]} == {"ants", "bees"}
    assert sum(map(sum, model["metrics"]["confusion_matrix"])) == 153
    assert model["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_predictions_and_downloaded_artifact_agree(stack, probe, tmp_path):
    images = val_images(10)
    files = [("files", (path.name, path.read_bytes(), "image/jpeg")) for path, _ in images]
    response = stack.http.post(f"/v1/models/{probe['model_id']}/predict", files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == [path.name for path, _ in images]
    assert all(len(p["labels"]) == 2 and sum(l["score"] for l in p["labels"]) == pytest.approx(1, abs=1e-4) for p in predictions)
    served = [p["labels"][0]["label"] for p in predictions]
    assert sum(label == truth for label, (_, truth) in zip(served, images)) >= 18

    archive = tmp_path / "model.zip"
    archive.write_bytes(stack.http.get(f"/v1/models/{probe['model_id']}/download").content)
    zipfile.ZipFile(archive).extractall(tmp_path)
    model = timm.create_model(f"local-dir:{tmp_path / probe['model_id']}", pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(model))
    with torch.inference_mode():
        batch = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in images])
        local = [model.pretrained_cfg["label_names"][i] for i in model(batch).argmax(1).tolist()]
    assert local == served


def test_auto_measures_on_the_training_split_and_is_never_worse_than_the_probe(stack, probe):
    """The default `auto` on the whole of hymenoptera, against the linear probe alone on the same data."""
    created = create_job(stack, probe["dataset_id"])
    # The requested backbone's probe is served as soon as it is measured, while the search goes on.
    serving = wait_until(lambda: (j := stack.http.get(f"/v1/jobs/{created['id']}").json())["model_id"] and j, 300,
                         "auto to serve its probe", interval=0.2, processes=stack.processes)  # fmt: skip
    assert serving["status"] == "running" and serving["strategy"] == "auto", serving
    image = HYMENOPTERA / "val" / "bees" / sorted(os.listdir(HYMENOPTERA / "val" / "bees"))[0]
    served = stack.http.post(f"/v1/models/{serving['model_id']}/predict", files={"files": (image.name, image.read_bytes())})
    assert served.status_code == 200, served.text
    served_probe = stack.http.get(f"/v1/models/{serving['model_id']}").json()
    assert (served_probe["backbone"], served_probe["strategy"]) == ("mobilenetv2_100", "linear_probe")
    # The same probe as the one asked for explicitly, to the image: same data, seed and features.
    assert served_probe["metrics"]["val_accuracy"] == probe["metrics"]["val_accuracy"]

    job = stack.wait_job(created["id"])
    assert job["status"] == "succeeded", job
    job_models = [m["id"] for m in stack.http.get("/v1/models").json()["data"] if m["job_id"] == job["id"]]
    if (job["backbone"], job["strategy"]) == ("mobilenetv2_100", "linear_probe"):
        assert job["model_id"] == served_probe["id"] and job_models == [served_probe["id"]]  # kept, not trained again
    else:  # the winner is the job's model; the probe it served meanwhile stays registered
        assert job["model_id"] != served_probe["id"] and sorted(job_models) == sorted([job["model_id"], served_probe["id"]])
    search = job["search"]
    assert search["budget_seconds"] == 60 and search["train_images"] == 245 and search["folds"] == 3
    assert [(t["backbone"], t["strategy"]) for t in search["trials"][:2]] == [
        ("mobilenetv2_100", "linear_probe"), ("tf_efficientnet_lite0.in1k", "linear_probe")]  # fmt: skip
    measured = [t for t in search["trials"] if t["skipped"] is None]
    assert all(0.8 < t["cv_accuracy"] <= 1 and t["seconds"] > 0 for t in measured)
    # A candidate is skipped only for the budget: estimated past what is left, or stopped when it ran out.
    budget = ("of the budget left", "when the budget ran out", "would run past the budget")
    assert all(any(why in t["skipped"] for why in budget) for t in search["trials"] if t["skipped"]), search["trials"]
    assert (job["backbone"], job["strategy"]) == (search["winner"]["backbone"], search["winner"]["strategy"])
    assert job["strategy_reason"] == search["reason"]
    job_events = events(stack, job["id"])
    auto_events = [e for e in job_events if e["type"] == "auto"]
    assert [e["data"]["strategy"] for e in auto_events] == [t["strategy"] for t in search["trials"]]
    # Served as soon as the requested probe's features existed, before any candidate was measured.
    kinds = [(e["type"], e["data"].get("model_id")) for e in job_events if e["type"] in ("auto", "model")]
    assert kinds[:2] == [("model", served_probe["id"]), ("auto", None)]

    # Never worse than the probe alone beyond noise: within the probe's own 95% interval; and where
    # the probe of the requested backbone won, the job is that probe, to the image.
    assert job["metrics"]["val_accuracy"] >= probe["metrics"]["val_accuracy_ci95"][0]
    if (job["backbone"], job["strategy"]) == ("mobilenetv2_100", "linear_probe"):
        assert job["metrics"]["val_accuracy"] == probe["metrics"]["val_accuracy"]
        assert job["metrics"]["val_loss"] == pytest.approx(probe["metrics"]["val_loss"], rel=1e-5)


def test_duplicated_message_for_finished_job_creates_no_second_model(stack, probe):
    celery = make_celery(Settings(broker_url=stack.env["VISIONTUNE_BROKER_URL"], data_dir=stack.data_dir))
    celery.send_task(FINETUNE_TASK, args=[probe["id"]])
    wait_until(
        lambda: any(e["type"] == "message_ignored" for e in events(stack, probe["id"])),
        120, "the worker to receive the duplicate", processes=stack.processes,
    )
    models = [m for m in stack.http.get("/v1/models").json()["data"] if m["job_id"] == probe["id"]]
    assert len(models) == 1
    assert stack.http.get(f"/v1/jobs/{probe['id']}").json()["model_id"] == probe["model_id"]


@pytest.fixture(scope="module")
def small_dataset(stack, small_hymenoptera_zip) -> dict:
    return stack.upload(small_hymenoptera_zip)


def test_full_fine_tune_loss_falls(stack, small_dataset):
    # Without the image cache, images are decoded and augmented by DataLoader worker processes,
    # started from inside the Celery pool process (kept images are augmented in the pool process).
    job = create_job(stack, small_dataset["id"], strategy="full",
                     hyperparameters={"epochs": 2, "batch_size": 8, "image_cache": False})  # fmt: skip
    job = stack.wait_job(job["id"])
    assert job["status"] == "succeeded", job
    assert job["hyperparameters"]["workers"] >= 1
    losses = [e["data"]["train_loss"] for e in events(stack, job["id"]) if e["type"] == "epoch"]
    assert len(losses) == 2 and losses[1] < losses[0]


def test_cancel_stops_the_worker(stack, small_dataset):
    job = create_job(stack, small_dataset["id"], strategy="full", hyperparameters={"epochs": 50, "batch_size": 8})
    wait_until(lambda: stack.http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 120, "job start",
               processes=stack.processes)
    cancelled = stack.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert stack.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    wait_until(lambda: any(e["type"] == "worker_stopped" for e in events(stack, job["id"])), 120,
               "the worker to stop", processes=stack.processes)
    final = stack.http.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["model_id"] is None


def test_job_resumes_from_checkpoint_when_its_worker_dies(stack, small_dataset):
    epochs = 5
    job = create_job(stack, small_dataset["id"], strategy="full", hyperparameters={"epochs": epochs, "batch_size": 8})
    running = wait_until(
        lambda: (j := stack.http.get(f"/v1/jobs/{job['id']}").json())["progress"]["epoch"] >= 1 and j,
        300, "the first epoch", interval=0.2, processes=stack.processes,
    )
    assert running["progress"]["epoch"] < epochs, "the job finished before the worker could be killed"
    # Kill the pool process that trains the job, as the OOM killer would. The Celery parent
    # survives, and with late acks + reject_on_worker_lost the message is delivered again.
    os.kill(int(running["worker"].rpartition(":")[2]), signal.SIGKILL)
    final = stack.wait_job(job["id"])
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 2 and final["worker"] != running["worker"]
    assert any(e["type"] == "status" and e["message"].startswith("resumed") for e in events(stack, job["id"]))
    model = stack.http.get(f"/v1/models/{final['model_id']}").json()
    assert model["metrics"]["best_epoch"] <= epochs


def test_bad_prediction_requests_are_refused_and_the_server_keeps_serving(stack, probe):
    url = f"/v1/models/{probe['model_id']}/predict"
    image = val_images(1)[0][0]
    not_image = stack.http.post(url, files=[("files", (image.name, image.read_bytes())), ("files", ("notes.txt", b"hello"))])
    assert not_image.status_code == 415 and "notes.txt" in not_image.json()["error"]["message"]
    too_many = stack.http.post(url, params={"top_k": 3}, files={"files": (image.name, image.read_bytes())})
    assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "top_k_too_large"
    assert stack.http.post(url, files={"other": ("x", b"")}).status_code == 422
    assert stack.http.post(f"/v1/models/model_{'0' * 24}/predict", files={"files": (image.name, image.read_bytes())}).status_code == 404
    assert stack.http.post(url, files={"files": (image.name, image.read_bytes())}).status_code == 200


HOSTILE_IMAGES = [  # (filename, bytes, expected status)
    ("bomb.png", png_header(100_000, 100_000), 422),
    ("negative.png", png_header(2**31, 10), 422),
    ("bomb.gif", gif_header(65_535, 65_535), 422),
    ("bomb.tif", tiff_header(200_000, 200_000), 422),
    ("zero.png", png_header(0, 10), 415),
    ("zero.gif", gif_header(0, 0), 415),
    ("truncated.png", png_header(64, 64), 415),
    ("truncated.jpg", sorted((HYMENOPTERA / "val" / "ants").iterdir())[0].read_bytes()[:2000], 415),
    ("icon.jpg", image_bytes("ICO"), 415),
    ("picture.jpg", image_bytes("PCX"), 415),
    ("page.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n", 415),
    ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', 415),
    ("zeros.jpg", bytes(1024 * 1024), 415),
    ("empty.jpg", b"", 415),
]


@pytest.mark.parametrize("route", ["predict", "embed"])
def test_hostile_images_are_refused_naming_the_file(stack, probe, route):
    """Pixel bombs, zero sizes, truncated files and formats outside the allow-list, each beside a
    good image, as multipart and as JSON: a 4xx naming the file, and the server keeps serving."""
    url = f"/v1/models/{probe['model_id']}/{route}"
    good = val_images(1)[0][0]
    for name, data, status in HOSTILE_IMAGES:
        files = [("files", (good.name, good.read_bytes())), ("files", (name, data))]
        as_json = {"images": [{"filename": name, "data": base64.b64encode(data).decode()}]}
        for response in (stack.http.post(url, files=files), stack.http.post(url, json=as_json)):
            assert response.status_code == status, (name, response.status_code, response.text)
            assert name in response.json()["error"]["message"], (name, response.text)
        raw = stack.http.post(url, content=data, headers={"Content-Type": "image/jpeg"})  # one image as the body
        assert raw.status_code == (422 if data == b"" else status), (name, raw.status_code, raw.text)
    assert stack.http.post(url, files={"files": (good.name, good.read_bytes())}).status_code == 200
    print(f"{route}: {2 * len(HOSTILE_IMAGES)} hostile image requests refused")


def test_backbone_sweep_ranks_backbones_and_promotes_a_row(stack, small_dataset):
    response = stack.http.post("/v1/sweeps", json={
        "dataset_id": small_dataset["id"], "backbones": ["mobilenetv2_100", "tf_efficientnet_lite0", "resnet18"],
    })  # fmt: skip
    assert response.status_code == 202, response.text
    sweep_id = response.json()["id"]
    sweep = wait_until(
        lambda: (s := stack.http.get(f"/v1/sweeps/{sweep_id}").json())["status"] == "finished" and s,
        600, "the sweep", interval=1.0, processes=stack.processes,
    )
    ranked = [row for row in sweep["rows"] if row["rank"] is not None]
    assert {row["backbone"] for row in ranked} == {"mobilenetv2_100", "tf_efficientnet_lite0"}
    assert [row["rank"] for row in ranked] == [1, 2]
    assert ranked[0]["val_accuracy"] >= ranked[1]["val_accuracy"] > 0.5
    assert all(row["seconds"] > 0 and row["num_params"] > 3_000_000 and row["model_id"] for row in ranked)
    missing = next(row for row in sweep["rows"] if row["backbone"] == "resnet18")  # not in WEIGHTS_DIR; Hub cache empty
    assert missing["status"] == "failed" and "resnet18" in missing["error"] and missing["rank"] is None

    promoted = stack.http.post(f"/v1/sweeps/{sweep_id}/promote", json={"backbone": ranked[0]["backbone"], "strategy": "full"})
    assert promoted.status_code == 202, promoted.text
    job = promoted.json()
    assert job["backbone"] == ranked[0]["backbone"] and job["strategy"] == "full"
    assert job["dataset_id"] == small_dataset["id"]
    stack.http.post(f"/v1/jobs/{job['id']}/cancel")


def test_batched_results_equal_one_by_one_and_json_equals_multipart(stack, probe):
    import asyncio

    import httpx

    url = f"/v1/models/{probe['model_id']}/predict"
    images = val_images(6)

    def scores(body):
        return {l["label"]: l["score"] for l in body["predictions"][0]["labels"]}

    one_by_one = [stack.http.post(url, files={"files": (p.name, p.read_bytes())}) for p, _ in images]
    assert all(r.headers["X-Batch-Size"] == "1" and r.headers["Server-Timing"].startswith("inference;dur=") for r in one_by_one)

    async def concurrently():
        async with httpx.AsyncClient(base_url=stack.url, headers=stack.http.headers, timeout=60) as client:
            return await asyncio.gather(*(client.post(url, files={"files": (p.name, p.read_bytes())}) for p, _ in images * 3))

    together = asyncio.run(concurrently())
    assert all(r.status_code == 200 for r in together)
    assert max(int(r.headers["X-Batch-Size"]) for r in together) > 1  # forward passes were shared
    for alone, batched in zip(one_by_one * 3, together):
        for label, score in scores(alone.json()).items():
            assert scores(batched.json())[label] == pytest.approx(score, abs=1e-5)

    body = {"images": [{"filename": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p, _ in images]}
    as_json = stack.http.post(url, json=body)
    assert as_json.status_code == 200, as_json.text
    for alone, prediction in zip(one_by_one, as_json.json()["predictions"]):
        assert prediction["labels"][0]["label"] == alone.json()["predictions"][0]["labels"][0]["label"]
    not_an_image = stack.http.post(url, json={"images": [{"filename": "x.jpg", "data": "bm90IGFuIGltYWdl"}]})
    assert not_an_image.status_code == 415 and "x.jpg" in not_an_image.json()["error"]["message"]
    no_images = stack.http.post(url, json={"images": []})
    assert no_images.status_code == 422 and "images" in no_images.json()["error"]["message"]

    # One image as the raw body: no multipart, the same answers.
    for (path, _), alone in zip(images, one_by_one):
        raw = stack.http.post(url, content=path.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert raw.status_code == 200, raw.text
        assert scores(raw.json()) == pytest.approx(scores(alone.json()), abs=1e-5)
    empty = stack.http.post(url, content=b"", headers={"Content-Type": "image/jpeg"})
    assert empty.status_code == 422 and empty.json()["error"]["code"] == "missing_file"


def test_several_api_processes_share_one_inference_process(stack, probe, tmp_path):
    """`visiontune serve --workers 2` on the same data, with the inference process on (the default
    on a GPU): two API processes decode and send their pixels to one process that runs the forward
    passes, answering concurrent requests exactly as the single-process API does. (Each API process
    with its own model cache, the default on a CPU, is what `stack`'s single-process API runs.)"""
    import asyncio
    import subprocess
    import sys

    import httpx

    port = free_port()
    env = {**stack.env, "VISIONTUNE_SERVING_INFERENCE_PROCESS": "on"}
    api = Process("api2", [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "2"], env, tmp_path)
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=stack.http.headers, timeout=120)
        wait_until(lambda: is_ready(http), 90, "the 2-process API", processes=[api])
        children = subprocess.run(["pgrep", "-P", str(api.popen.pid)], capture_output=True, text=True).stdout.split()
        commands = {int(pid): Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children}
        assert sum(b"spawn_main" in c for c in commands.values()) == 2, commands  # (beside multiprocessing's resource tracker)
        (inference,) = [pid for pid, c in commands.items() if b"app.serving.inference_process" in c]
        url = f"/v1/models/{probe['model_id']}/predict"
        images = val_images(4)
        expected = [stack.http.post(url, files={"files": (p.name, p.read_bytes())}).json()["predictions"] for p, _ in images]

        async def concurrently():
            async with httpx.AsyncClient(base_url=str(http.base_url), headers=http.headers, timeout=120) as client:
                return await asyncio.gather(*(client.post(url, files={"files": (p.name, p.read_bytes())}) for p, _ in images * 4))

        responses = asyncio.run(concurrently())
        assert [r.status_code for r in responses] == [200] * len(responses)
        for response, want in zip(responses, expected * 4):
            got = response.json()["predictions"][0]["labels"]
            assert [l["label"] for l in got] == [l["label"] for l in want[0]["labels"]]
            assert [l["score"] for l in got] == pytest.approx([l["score"] for l in want[0]["labels"]], abs=1e-5)
        # One /metrics for all the processes: their counts add up, whichever process answers the scrape.
        from prometheus_client.parser import text_string_to_metric_families

        families = text_string_to_metric_families(http.get("/metrics").text)
        predicted = sum(s.value for f in families for s in f.samples if s.name == "visiontune_predicted_images_total")
        assert predicted == len(responses)
        http.close()
        # `visiontune serve` killed outright (nothing of it runs to stop its children): the inference
        # process notices and ends, rather than holding the GPU's memory.
        os.kill(api.popen.pid, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{inference}").exists() or _state(inference) == "Z", 30,
                   "the inference process to end after visiontune serve was killed")  # fmt: skip
    finally:
        api.stop()


def _state(pid: int) -> str:
    """A process's state letter (Z: ended, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_threshold_abstains_and_embed_returns_pooled_features(stack, probe):
    url = f"/v1/models/{probe['model_id']}"
    files = [("files", (p.name, p.read_bytes())) for p, _ in val_images(5)]
    predictions = stack.http.post(f"{url}/predict", params={"threshold": 1.0}, files=files).json()["predictions"]
    assert all(p["labels"] is None for p in predictions)  # no calibrated score reaches 1.0
    kept = stack.http.post(f"{url}/predict", params={"threshold": 0.0}, files=files).json()["predictions"]
    assert all(p["labels"] for p in kept)
    embedded = stack.http.post(f"{url}/embed", files=files)
    assert embedded.status_code == 200, embedded.text
    body = embedded.json()
    assert body["dimensions"] == 1280 and len(body["embeddings"]) == len(files)
    assert all(len(e["embedding"]) == 1280 for e in body["embeddings"])


def test_onnx_export_matches_pytorch_on_validation_images(stack, probe, tmp_path):
    import numpy as np
    import onnxruntime

    url = f"/v1/models/{probe['model_id']}/exports"
    files = [("files", (p.name, p.read_bytes())) for p, _ in val_images(8)]
    before = stack.http.post(f"/v1/models/{probe['model_id']}/predict", files=files)
    assert before.headers["X-Runtime"] == "torch"  # no export yet
    assert stack.http.get(f"{url}/onnx").status_code == 404
    response = stack.http.post(url, json={"format": "onnx"})
    assert response.status_code == 202, response.text
    export = stack.wait_export(probe["model_id"])  # built by the background worker
    assert export["status"] == "ready", export
    parity = export["parity"]
    assert parity["passed"] and parity["images"] == 153 and parity["top1_agreement"] == 1.0
    assert parity["max_abs_prob_diff"] <= 1e-4
    again = stack.http.post(url, json={"format": "onnx"})  # a model is immutable: its export is kept
    assert again.status_code == 200 and again.json() == export
    # The API notices the new export: the next prediction loads the model again and may run on it
    # (the faster runtime, timed at load); either way the answers stay the same.
    after = stack.http.post(f"/v1/models/{probe['model_id']}/predict", files=files)
    assert after.status_code == 200 and after.headers["X-Runtime"] in ("torch", "onnxruntime")
    for old, new in zip(before.json()["predictions"], after.json()["predictions"], strict=True):
        assert [l["label"] for l in old["labels"]] == [l["label"] for l in new["labels"]]
        assert [l["score"] for l in old["labels"]] == pytest.approx([l["score"] for l in new["labels"]], abs=1e-4)

    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(stack.http.get(f"{url}/onnx/download").content)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
    (probabilities,) = session.run(None, {"pixels": pixels})
    assert probabilities.shape == (2, 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert stack.http.post(url, json={"format": "tflite"}).status_code == 422


def test_an_int8_export_is_kept_only_within_its_gate(stack, probe):
    """Static int8 calibrated on the model's training images: ready only if its top-1 agrees with
    PyTorch on >= 99% of the 153 validation images and its accuracy drops <= 0.5 points; either
    way the report says what was measured, and a refused one cannot be downloaded."""
    url = f"/v1/models/{probe['model_id']}/exports"
    assert stack.http.post(url, json={"format": "onnx-int8"}).status_code == 202

    def finished():
        export = stack.http.get(f"{url}/onnx-int8").json()
        return export if export["status"] != "processing" else None

    export = wait_until(finished, 300, "the int8 export", processes=stack.processes)
    parity = export["parity"]
    assert parity["images"] == 153 and parity["calibration_images"] == 128
    within = parity["top1_agreement"] >= 0.99 and parity["accuracy_fp32"] - parity["accuracy_int8"] <= 0.005
    assert parity["passed"] == within and export["status"] == ("ready" if within else "failed"), export
    download = stack.http.get(f"{url}/onnx-int8/download")
    if within:
        fp32_weights = stack.http.get(f"/v1/models/{probe['model_id']}").json()["size_bytes"]
        assert download.status_code == 200 and len(download.content) < fp32_weights / 2  # int8 weights
        image = val_images(1)[0][0]
        served = stack.http.post(f"/v1/models/{probe['model_id']}/predict", files=[("files", (image.name, image.read_bytes()))])
        assert served.headers["X-Runtime"] in ("torch", "onnxruntime", "onnxruntime-int8")
    else:
        assert export["error"]["code"] == "parity_failed" and "int8 export refused" in export["error"]["message"]
        assert download.status_code == 409 and download.json()["error"]["code"] == "export_not_ready"


def test_versions_and_moving_an_alias_under_load(stack, small_dataset):
    import asyncio
    import threading

    import httpx

    jobs = [create_job(stack, small_dataset["id"], strategy="linear_probe", model_name="ants-bees", seed=s) for s in (1, 2)]
    models = [stack.http.get(f"/v1/models/{stack.wait_job(j['id'])['model_id']}").json() for j in jobs]
    assert sorted(m["version"] for m in models) == [1, 2] and {m["name"] for m in models} == {"ants-bees"}
    by_version = {m["version"]: m["id"] for m in models}
    assert stack.http.get("/v1/models/ants-bees@2").json()["id"] == by_version[2]
    assert stack.http.get("/v1/models/ants-bees@production").status_code == 404

    moved = stack.http.put("/v1/models/ants-bees/aliases/production", json={"version": 1})
    assert moved.status_code == 200 and moved.json()["model_id"] == by_version[1]
    assert stack.http.get(f"/v1/models/{by_version[1]}").json()["aliases"] == ["production"]

    image = val_images(1)[0][0].read_bytes()
    stop, moved = threading.Event(), threading.Event()
    # What the thread saw, checked in the test's own thread after it ends: an assert inside the
    # thread would only end the thread, never fail the test.
    flips: list[int] = []
    crashed: list[BaseException] = []

    def flip():  # move the alias back and forth while requests are in flight
        version = 1
        try:
            with httpx.Client(base_url=stack.url, headers=stack.http.headers, timeout=60) as http:
                while not stop.is_set():
                    version = 3 - version
                    flips.append(http.put("/v1/models/ants-bees/aliases/production", json={"version": version}).status_code)
                    moved.set()
        except BaseException as exc:  # handed to the test's thread below
            crashed.append(exc)
        finally:
            moved.set()

    async def load():
        async with httpx.AsyncClient(base_url=stack.url, headers=stack.http.headers, timeout=60) as client:
            async def one():
                return await client.post("/v1/models/ants-bees@production/predict", files={"files": ("a.jpg", image)})
            return await asyncio.gather(*(one() for _ in range(60)))

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        responses = asyncio.run(load())
        moved.wait(timeout=120)  # at least one move happened, however the two threads were scheduled
    finally:
        stop.set()
        flipper.join()
    assert crashed == [], crashed
    assert flips and flips == [200] * len(flips), flips  # there were moves, and every one succeeded
    assert [r.status_code for r in responses] == [200] * 60  # zero failed requests
    served_by = {r.json()["model_id"] for r in responses}
    assert served_by <= set(by_version.values())  # always a whole, registered model
    assert all(len(r.json()["predictions"][0]["labels"]) == 2 for r in responses)

    # The alias points at one of the two; the version it points at cannot go until it moves.
    at = stack.http.get("/v1/models/ants-bees@production").json()["version"]
    refused = stack.http.delete(f"/v1/models/ants-bees@{at}")
    assert refused.status_code == 409 and "ants-bees@production" in refused.json()["error"]["message"]
    assert stack.http.put("/v1/models/ants-bees/aliases/production", json={"version": 1}).status_code == 200
    assert stack.http.delete("/v1/models/ants-bees@2").status_code == 204
    assert stack.http.get(f"/v1/models/{by_version[2]}").status_code == 404
    assert stack.http.get("/v1/models/ants-bees@1").json()["id"] == by_version[1]
    assert not (stack.data_dir / "models" / by_version[2]).exists()


def test_the_api_and_the_worker_serve_their_metrics(stack, probe):
    """Prometheus text from both: the API's predictions and model cache, and the training
    worker's epochs and jobs (written by its pool processes, served by its main process)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    def scrape(url: str) -> dict[str, float]:
        text = httpx.get(url, timeout=30).text
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
                totals[key] = totals.get(key, 0) + sample.value
        return totals

    image = val_images(1)[0][0]
    assert stack.http.post(f"/v1/models/{probe['model_id']}/predict", files={"files": (image.name, image.read_bytes())}).status_code == 200
    api = scrape(f"{stack.url}/metrics")
    assert sum(v for k, v in api.items() if k.startswith("visiontune_predicted_images_total")) >= 1
    assert api["visiontune_model_cache_loads_total"] >= 1 and api["visiontune_model_cache_bytes"] > 1_000_000
    assert api["visiontune_jobs|status=succeeded"] >= 1
    worker = scrape(f"http://127.0.0.1:{stack.env['VISIONTUNE_WORKER_METRICS_PORT']}/metrics")
    assert worker["visiontune_worker_jobs_total|outcome=succeeded"] >= 1
    assert worker["visiontune_epoch_seconds_count"] >= 1 and worker["visiontune_train_images_per_second"] > 0


def test_a_job_for_a_gpu_is_not_taken_by_a_cpu_worker(stack, small_dataset):
    """This machine's worker has no GPU: it consumes `training` and `training.cpu`, never
    `training.gpu`. The job waits, and its events say why; it is then cancelled."""
    job = create_job(stack, small_dataset["id"], strategy="linear_probe", accelerator="gpu")
    note = wait_until(lambda: next((e for e in events(stack, job["id"]) if e["message"].startswith("waiting for a gpu")), None),
                      60, "the note that no gpu worker runs", processes=stack.processes)  # fmt: skip
    assert note["message"] == "waiting for a gpu worker: none is running"
    assert stack.http.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    assert stack.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
