"""The Python SDK without a server: retries (503 with Retry-After, 429, refused connections), the
error envelope, Server-Sent Events (a recorded stream, a dropped connection resumed with
Last-Event-ID), and packing a folder. httpx.MockTransport stands in for a server only where a real
one cannot misbehave on demand."""

import asyncio
import io
import json
import shutil
import socket
import time
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import visiontune_client as vt
from visiontune_client.cli import Bar
from visiontune_client.resources.jobs import ProgressLine
from visiontune_client import _http
from visiontune_client.packing import ProgressReader, pack_folder
from visiontune_client.streams import SSEDecoder

from tests.conftest import HYMENOPTERA

JOB_ID = "job_" + "0" * 24
NOW = "2025-01-01T00:00:00Z"


def job_json(status: str = "running", error: dict | None = None) -> dict:
    progress = {"epoch": 1, "epochs": 3, "phase": "training", "step": 4, "steps": 10,
                "images_per_second": 50.0, "eta_seconds": 75.0, "queue_position": None}  # fmt: skip
    return {"id": JOB_ID, "dataset_id": "ds_" + "0" * 24, "backbone": "mobilenetv2_100", "strategy": "linear_probe",
            "model_name": None, "status": status, "progress": progress, "metrics": {}, "model_id": None,
            "error": error, "created_at": NOW, "started_at": NOW, "finished_at": None}  # fmt: skip


def envelope(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message, "details": [{"loc": ["x"]}]}}


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The SDK's pauses (retries, reconnections), recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=slept.append))
    return slept


def mock_client(handler, **options) -> vt.Client:
    return vt.Client(base_url="http://vt.test", api_key="secret", transport=httpx.MockTransport(handler), **options)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- configuration and errors ---------------------------------------------------------------------


def test_a_missing_api_key_is_refused_at_construction(monkeypatch):
    monkeypatch.delenv("VISIONTUNE_API_KEY", raising=False)
    with pytest.raises(vt.MissingAPIKeyError, match="VISIONTUNE_API_KEY"):
        vt.Client()


def test_url_and_key_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("VISIONTUNE_API_URL", "http://api.example:9000/")
    monkeypatch.setenv("VISIONTUNE_API_KEY", "from-env")
    with vt.Client() as client:
        assert client.base_url == "http://api.example:9000"
        assert client._t._http.headers["Authorization"] == "Bearer from-env"


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, vt.ValidationError), (401, vt.AuthenticationError), (403, vt.PermissionDeniedError),
     (404, vt.NotFoundError), (409, vt.ConflictError), (413, vt.ValidationError), (415, vt.ValidationError),
     (422, vt.ValidationError), (429, vt.RateLimitError), (503, vt.ServiceUnavailableError), (507, vt.APIError)],
)  # fmt: skip
def test_error_statuses_map_to_their_classes(status, cls):
    response = httpx.Response(status, json=envelope("some_code", "Some message."), headers={"X-Request-ID": "req-1"})
    error = _http.error_from_response(response)
    assert type(error) is cls
    assert (error.status_code, error.code, error.message, error.request_id) == (
        status,
        "some_code",
        "Some message.",
        "req-1",
    )
    assert error.details == [{"loc": ["x"]}]
    assert str(error) == f"{status} some_code: Some message."


def test_an_error_without_the_envelope_still_says_what_happened():
    error = _http.error_from_response(httpx.Response(502, text="<html>upstream down</html>"))
    assert type(error) is vt.APIError
    assert str(error) == "502 bad_gateway: <html>upstream down</html>"


# -- retries -----------------------------------------------------------------------------------------


def test_503_is_retried_after_the_servers_retry_after(sleeps):
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if len(requests) < 3:
            return httpx.Response(503, json=envelope("unavailable", "Broker down."), headers={"Retry-After": "2"})
        return httpx.Response(200, json=job_json())

    with mock_client(handler) as client:
        job = client.jobs.get(JOB_ID)
    assert job.id == JOB_ID and job.progress.epochs == 3 and job.raw["backbone"] == "mobilenetv2_100"
    assert sleeps == [2.0, 2.0]
    assert len(requests) == 3
    assert all(r.headers["Authorization"] == "Bearer secret" for r in requests)


def test_429_is_retried_even_for_a_post_then_raised(sleeps):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        return httpx.Response(429, json=envelope("quota_exceeded", "At most 1 concurrent job."),
                              headers={"X-Request-ID": "req-429"})  # fmt: skip

    with mock_client(handler) as client, pytest.raises(vt.RateLimitError) as caught:
        client.jobs.create("ds_" + "0" * 24)
    assert calls == ["POST"] * 4  # the first try and max_retries=3 more
    for attempt, delay in enumerate(sleeps):  # 0.5 s doubling, less up to half of it
        assert 0.25 * 2**attempt <= delay <= 0.5 * 2**attempt
    assert len(sleeps) == 3
    assert caught.value.request_id == "req-429"
    assert str(caught.value) == "429 quota_exceeded: At most 1 concurrent job."


def test_a_refused_connection_is_retried_only_for_idempotent_requests(sleeps):
    port = closed_port()
    with vt.Client(base_url=f"http://127.0.0.1:{port}", api_key="secret") as client:
        with pytest.raises(vt.APIConnectionError) as caught:
            client.jobs.get(JOB_ID)
        assert str(caught.value) == f"cannot reach http://127.0.0.1:{port}/v1/jobs/{JOB_ID}: connection refused"
        assert len(sleeps) == 3
        with pytest.raises(vt.APIConnectionError):
            client.jobs.cancel(JOB_ID)  # a POST: perhaps done already, never repeated
        assert len(sleeps) == 3


def test_the_async_client_retries_too():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            return httpx.Response(503, json=envelope("unavailable", "Database down."), headers={"Retry-After": "0"})
        return httpx.Response(200, json=job_json())

    async def main() -> vt.Job:
        async with vt.AsyncClient(
            base_url="http://vt.test", api_key="k", transport=httpx.MockTransport(handler)
        ) as client:
            return await client.jobs.get(JOB_ID)

    assert asyncio.run(main()).status == "running"
    assert calls == [f"/v1/jobs/{JOB_ID}"] * 2


# -- Server-Sent Events -------------------------------------------------------------------------------


def sse(event: str, data: dict, id: int | None = None) -> bytes:
    """One event as the server (sse-starlette) writes it."""
    return (
        f"id: {id}\r\n" if id is not None else ""
    ).encode() + f"event: {event}\r\ndata: {json.dumps(data)}\r\n\r\n".encode()


def stored(id: int, type: str, message: str, data: dict | None = None) -> bytes:
    return sse(type, {"id": id, "type": type, "message": message, "data": data or {}, "created_at": NOW}, id)


PROGRESS = {"epoch": 0, "epochs": 3, "phase": "training", "step": 5, "steps": 10, "images_per_second": 42.0,
            "eta_seconds": 75.0, "queue_position": None}  # fmt: skip
EPOCH = {"epoch": 1, "epochs": 3, "val_accuracy": 0.9, "train_loss": 0.3}
# What a job's stream sent before its connection broke: two events, a keep-alive, a progress event,
# and the start of a third event that never arrived whole.
BEFORE_DROP = (
    stored(1, "status", "running on host:1") + b": ping - 2025-01-01 00:00:15+00:00\r\n\r\n"
    + sse("progress", PROGRESS) + stored(2, "epoch", "epoch 1/3", EPOCH) + b"id: 3\r\nevent: ep"
)  # fmt: skip
AFTER_RECONNECT = (
    stored(3, "epoch", "epoch 2/3", EPOCH | {"epoch": 2, "val_accuracy": 0.95})
    + sse("progress", PROGRESS | {"epoch": 2, "phase": "validation"}) + sse("end", {"status": "failed"})
)  # fmt: skip


class Dropping(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body sent in uneven chunks (lines cut anywhere), then a broken connection."""

    def __init__(self, body: bytes, then_drop: bool):
        self.chunks = [body[i : i + 37] for i in range(0, len(body), 37)]
        self.then_drop = then_drop
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.then_drop:
            raise httpx.ReadError("connection reset by peer")

    async def __aiter__(self):
        for chunk in self:
            yield chunk

    def close(self) -> None:
        self.closed = True


class RecordedJob:
    """The job's event stream, dropped once; then the job, failed."""

    def __init__(self):
        self.stream_requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("Accept") != "text/event-stream":
            return httpx.Response(200, json=job_json("failed", {"code": "out_of_memory", "message": "Out of memory."}))
        self.stream_requests.append(request)
        first = len(self.stream_requests) == 1
        body = Dropping(BEFORE_DROP if first else AFTER_RECONNECT, then_drop=first)
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, stream=body)


def test_the_decoder_reads_events_comments_and_multiline_data():
    decoder = SSEDecoder()
    lines = ': keep-alive\n\nid: 7\nevent: status\ndata: {"a":\ndata:1}\n\nevent: progress\ndata: x\n\ndata: y\n\n'
    events = [e for e in map(decoder.feed, lines.split("\n")) if e is not None]
    assert [(e.event, e.data, e.id) for e in events] == [
        ("status", '{"a":\n1}', "7"),
        ("progress", "x", None),
        ("message", "y", None),
    ]
    assert decoder.last_event_id == "7"


def test_a_dropped_stream_resumes_after_the_last_event_id(sleeps):
    recorded = RecordedJob()
    with mock_client(recorded) as client:
        events = list(client.jobs.stream(JOB_ID))
    assert [(e.type, e.id) for e in events] == [
        ("status", 1),
        ("progress", None),
        ("epoch", 2),
        ("epoch", 3),
        ("progress", None),
        ("end", None),
    ]
    assert events[2].data["val_accuracy"] == 0.9 and events[2].message == "epoch 1/3"
    assert events[1].data["eta_seconds"] == 75.0
    assert events[-1].data == {"status": "failed"}
    assert [r.headers.get("Last-Event-ID") for r in recorded.stream_requests] == [None, "2"]
    assert len(sleeps) == 1


def test_leaving_a_stream_early_closes_its_connection():
    body = Dropping(BEFORE_DROP, then_drop=False)
    with mock_client(lambda _: httpx.Response(200, stream=body)) as client:
        for event in client.jobs.stream(JOB_ID):
            assert event.type == "status"
            break
        assert body.closed


def test_the_async_stream_resumes_too():
    recorded = RecordedJob()

    async def main() -> list[vt.Event]:
        async with vt.AsyncClient(
            base_url="http://vt.test", api_key="k", transport=httpx.MockTransport(recorded)
        ) as client:
            return [event async for event in client.jobs.stream(JOB_ID, last_event_id=0)]

    assert [e.id for e in asyncio.run(main())] == [1, None, 2, 3, None, None]
    assert [r.headers.get("Last-Event-ID") for r in recorded.stream_requests] == ["0", "2"]


def test_waiting_for_a_job_shows_progress_and_raises_its_failure(sleeps, capsys):
    with mock_client(RecordedJob()) as client, pytest.raises(vt.JobFailedError) as caught:
        client.jobs.wait(JOB_ID, progress=True)
    assert (caught.value.code, caught.value.message, caught.value.resource.status) == (
        "out_of_memory",
        "Out of memory.",
        "failed",
    )
    assert str(caught.value) == f"job {JOB_ID} failed: out_of_memory: Out of memory."
    shown = capsys.readouterr().err.splitlines()  # not a terminal: a line per change
    assert "training | epoch 0/3 | 42 img/s | ETA 1m15s" in shown
    assert "validation | epoch 2/3 | val_accuracy 0.950 | 42 img/s | ETA 1m15s" in shown
    assert len(shown) == len(set(shown))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("packing", "labels"), [(True, ["packing", "uploading"]), (False, ["uploading"])])
def test_the_upload_bar_names_what_it_is_doing(packing, labels):
    """A folder is packed, then uploaded (the callback starts again from 0); an archive is only uploaded."""
    out = Terminal()
    bar = Bar(out, packing=packing)
    packed = [(0, 100), (50, 100), (100, 100)] if packing else []  # bytes packed, then bytes uploaded
    for done, total in packed + [(0, 120), (60, 120), (120, 120)]:
        bar(done, total)
    bar.finish()
    shown = [line.split()[0] for line in out.getvalue().strip().split("\r") if line]
    assert sorted(set(shown), key=shown.index) == labels and out.getvalue().endswith("MiB\n")


def test_on_a_terminal_the_progress_line_is_rewritten_in_place():
    out = Terminal()
    line = ProgressLine(out)
    progress = {"phase": "training", "epoch": 1, "epochs": 3, "images_per_second": 40.0, "eta_seconds": 61}
    for event in (vt.Event(None, "progress", "", progress, None), vt.Event(None, "progress", "", progress, None),
                  vt.Event(5, "epoch", "", {"val_accuracy": 0.9}, None)):  # fmt: skip
        line.update(event)
    line.finish()
    assert out.getvalue() == ("\rtraining | epoch 1/3 | 40 img/s | ETA 1m01s"
                              "\rtraining | epoch 1/3 | val_accuracy 0.900 | 40 img/s | ETA 1m01s\n")  # fmt: skip


# -- packing a folder ----------------------------------------------------------------------------------


def small_image_folder(root: Path, per_class: int = 2) -> list[str]:
    """A few hymenoptera images in train/<class> and val/<class> under `root`; their names in the zip."""
    names = []
    for split in ("train", "val"):
        for label in ("ants", "bees"):
            (root / split / label).mkdir(parents=True)
            for image in sorted((HYMENOPTERA / split / label).iterdir())[:per_class]:
                shutil.copyfile(image, root / split / label / image.name)
                names.append(f"{split}/{label}/{image.name}")
    return sorted(names)


def test_a_folder_is_zipped_as_an_image_folder(tmp_path):
    root = tmp_path / "bugs"
    expected = small_image_folder(root)
    (root / ".DS_Store").write_bytes(b"finder")
    (root / "train" / ".cache").mkdir()
    (root / "train" / ".cache" / "x").write_bytes(b"x")
    reported: list[tuple[int, int]] = []
    archive = pack_folder(root, lambda done, total: reported.append((done, total)))
    try:
        with zipfile.ZipFile(archive) as zf:
            assert sorted(zf.namelist()) == expected
            assert zf.read(expected[0]) == (root / expected[0]).read_bytes()
    finally:
        archive.unlink()
    total = sum((root / name).stat().st_size for name in expected)
    assert len(reported) == len(expected) and reported[-1] == (total, total)


def test_upload_progress_counts_the_bytes_read(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"z" * 200_000)
    reported: list[tuple[int, int]] = []
    with archive.open("rb") as file:
        reader = ProgressReader(file, lambda *progress: reported.append(progress))
        request = httpx.Request("POST", "http://vt.test/v1/datasets", files=[("file", ("a.zip", reader))])
        body = b"".join(request.stream)
    assert int(request.headers["Content-Length"]) == len(body) > 200_000
    assert reported[-1] == (200_000, 200_000)


@pytest.mark.parametrize("layout", ["loose images", "empty class folders", "splits without classes"])
def test_a_folder_without_class_subfolders_is_refused_before_any_upload(tmp_path, layout):
    root = tmp_path / "photos"
    image = next((HYMENOPTERA / "train" / "ants").iterdir())
    if layout == "loose images":
        root.mkdir()
        shutil.copyfile(image, root / image.name)
    elif layout == "empty class folders":
        (root / "ants").mkdir(parents=True)
        (root / "bees").mkdir()
    else:
        (root / "train").mkdir(parents=True)
        shutil.copyfile(image, root / "train" / image.name)
    # A server that is not there: any request would raise APIConnectionError instead.
    client = vt.Client(base_url=f"http://127.0.0.1:{closed_port()}", api_key="k", max_retries=0)
    with client, pytest.raises(vt.InvalidDatasetError, match="no class subfolders"):
        client.datasets.upload(root)
