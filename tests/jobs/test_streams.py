"""Live progress, in-process: queue positions, and job and dataset events as Server-Sent Events
(replayed for a finished job, resumed with Last-Event-ID, keep-alive comments, ended when the job
ends). A job training while it is streamed is in tests/e2e (a real worker)."""

import json
import threading
import time

import pytest

from tests.archives import colour_dataset_zip
from tests.tenants.test_tenancy import new_tenant
from tests.uploads import upload_ready

SSE = {"Accept": "text/event-stream"}


def read_sse(response, stop=lambda event: event.get("event") == "end") -> list[dict]:
    """The stream's events as dicts of their fields (`comment` for keep-alive lines), up to the
    first for which `stop` is true (the `end` event), or until the server closes the stream."""
    events, current = [], {}
    for line in response.iter_lines():
        if line == "":
            if current:
                events.append(current)
                if stop(current):
                    break
            current = {}
        elif line.startswith(":"):
            events.append({"comment": line[1:].strip()})
        else:
            field, _, value = line.partition(":")
            current[field] = value.removeprefix(" ")
    return events


@pytest.fixture
def dataset_id(client) -> str:
    return upload_ready(client, colour_dataset_zip(), "colors.zip")["id"]


def new_job(client, dataset_id) -> dict:
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100"})
    assert response.status_code == 202, response.text
    return response.json()


def test_queued_jobs_report_their_place_in_the_queue(client, dataset_id):
    first, second = new_job(client, dataset_id), new_job(client, dataset_id)
    assert first["progress"] == {"epoch": 0, "epochs": 0, "phase": "queued", "step": None, "steps": None,
                                 "images_per_second": None, "eta_seconds": None, "queue_position": 1}  # fmt: skip
    assert second["progress"]["queue_position"] == 2
    client.post(f"/v1/jobs/{first['id']}/cancel")
    assert client.get(f"/v1/jobs/{second['id']}").json()["progress"]["queue_position"] == 1
    cancelled = client.get(f"/v1/jobs/{first['id']}").json()["progress"]
    assert cancelled["phase"] == "cancelled" and cancelled["queue_position"] is None


def test_a_finished_jobs_stream_replays_its_events_and_ends_and_resumes_after_last_event_id(client, dataset_id):
    job = new_job(client, dataset_id)
    client.post(f"/v1/jobs/{job['id']}/cancel")
    stored = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]

    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=SSE) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
    assert [int(e["id"]) for e in events[:-1]] == [e["id"] for e in stored]
    assert [json.loads(e["data"]) for e in events[:-1]] == stored
    assert [e["event"] for e in events[:-1]] == [e["type"] for e in stored]
    assert events[-1] == {"event": "end", "data": json.dumps({"status": "cancelled"})}

    # Reconnecting after the first event (as EventSource does, with Last-Event-ID): only the later ones.
    resumed_headers = SSE | {"Last-Event-ID": str(stored[0]["id"])}
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=resumed_headers) as response:
        resumed = read_sse(response)
    assert [int(e["id"]) for e in resumed[:-1]] == [e["id"] for e in stored[1:]]
    # `stream=true` for clients that cannot set Accept; `after` as the starting point.
    with client.stream("GET", f"/v1/jobs/{job['id']}/events?stream=true&after={stored[-1]['id']}") as response:
        assert read_sse(response) == [{"event": "end", "data": json.dumps({"status": "cancelled"})}]

    bad = client.get(f"/v1/jobs/{job['id']}/events", headers=SSE | {"Last-Event-ID": "not-a-number"})
    assert bad.status_code == 422 and "last-event-id" in bad.json()["error"]["message"]


def test_a_live_stream_sends_progress_keep_alives_and_the_cancellation_then_ends(client, dataset_id, monkeypatch):
    from app.core import config

    monkeypatch.setenv("VISIONTUNE_SSE_KEEPALIVE_SECONDS", "0.2")
    config.get_settings.cache_clear()
    job = new_job(client, dataset_id)

    def cancel_soon():
        time.sleep(1.0)
        client.post(f"/v1/jobs/{job['id']}/cancel")

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=SSE) as response:
        events = read_sse(response)
    canceller.join()
    kinds = [e.get("event", "comment" if "comment" in e else None) for e in events]
    assert kinds[0] == "status" and json.loads(events[0]["data"])["message"].startswith("queued")
    progress = json.loads(events[kinds.index("progress")]["data"])
    assert progress["phase"] == "queued" and progress["queue_position"] == 1
    assert "comment" in kinds[kinds.index("progress") :]  # keep-alive while nothing happens
    assert json.loads(events[-2]["data"])["message"] == "cancelled" and kinds[-1] == "end"


def test_another_tenants_job_and_dataset_streams_are_404(client, dataset_id):
    job = new_job(client, dataset_id)
    _, headers = new_tenant(client, "other")
    assert client.get(f"/v1/jobs/{job['id']}/events", headers=headers | SSE).status_code == 404
    assert client.get(f"/v1/datasets/{dataset_id}?stream=true", headers=headers).status_code == 404


def test_a_datasets_stream_shows_it_and_ends_once_it_is_ready(client, dataset_id):
    with client.stream("GET", f"/v1/datasets/{dataset_id}", headers=SSE) as response:
        events = read_sse(response)
    assert [e["event"] for e in events] == ["dataset", "end"]
    assert json.loads(events[0]["data"]) == client.get(f"/v1/datasets/{dataset_id}").json()
    assert json.loads(events[1]["data"]) == {"status": "ready"}


def test_a_stream_closes_after_sse_max_seconds_and_the_client_resumes(client, dataset_id, monkeypatch):
    """A job that waits for a worker that never comes holds no connection forever: the stream ends
    without `end`, and a client reconnects with Last-Event-ID."""
    from app.core import config

    monkeypatch.setenv("VISIONTUNE_SSE_MAX_SECONDS", "1")
    config.get_settings.cache_clear()
    job = new_job(client, dataset_id)
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=SSE) as response:
        events = read_sse(response)
    assert [e.get("event") for e in events if "event" in e] == ["status", "progress"]
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=SSE | {"Last-Event-ID": events[0]["id"]}) as response:
        assert [e.get("event") for e in read_sse(response) if "event" in e] == ["progress"]
