"""GET /metrics: Prometheus's text format from prometheus-client, no tenant key needed; requests
counted by route template (never by raw path, which would make a series per id), jobs by status
from the database and queue depth from the broker at scrape time; and it can be turned off."""

from prometheus_client.parser import text_string_to_metric_families

from tests.archives import colour_dataset_zip
from tests.uploads import upload_ready


def samples(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers={"Authorization": ""})  # no key
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}  # fmt: skip


def test_requests_jobs_and_queues_are_counted(client):
    dataset = upload_ready(client, colour_dataset_zip())
    route = ("visiontune_http_requests_total", (("method", "GET"), ("route", "/v1/datasets/{dataset_id}"), ("status", "404")))
    before = samples(client).get(route, 0)  # the counters are this process's, other tests' requests included
    for _ in range(2):
        client.get(f"/v1/datasets/ds_{'0' * 24}")  # unknown ids: one series for the route, not one per id
    client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100"})
    found = samples(client)
    assert found[route] - before == 2
    assert not any("ds_000" in str(labels) for _, labels in found)
    assert found[("visiontune_jobs", (("status", "queued"),))] == 1
    # The embedded broker holds the job's message: no worker runs in this test.
    assert found[("visiontune_queue_messages", (("queue", "training"),))] == 1
    assert ("visiontune_http_request_duration_seconds_count", (("method", "POST"), ("route", "/v1/jobs"))) in found


def test_metrics_can_be_turned_off(settings_env, monkeypatch):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import _clear_caches

    monkeypatch.setenv("VISIONTUNE_METRICS_ENABLED", "false")
    _clear_caches()
    with TestClient(create_app()) as client:
        assert client.get("/metrics").status_code == 404
