"""Webhooks, in-process with a real receiver on 127.0.0.1: registration and its SSRF refusals, signed
deliveries (verified with the standardwebhooks library), retries with backoff until the attempts
are spent, the delivery log, resending. The worker's task body is called directly, as a background
worker calls it (tests/e2e has a real worker send them)."""

import time

import pytest
from sqlalchemy import select

from app.core import outbox
from app.core.db import session_scope
from app.core.config import get_settings
from app.db.tables import WebhookDelivery
from app.webhooks.runner import run_delivery
from tests.archives import colour_dataset_zip
from tests.conftest import BOTH_DATABASES, free_port
from tests.tenants.test_tenancy import new_tenant
from tests.uploads import upload_ready
from tests.webhook_receiver import Receiver



@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def private_allowed(monkeypatch, settings_env):
    """The operator's setting that lets webhooks reach 127.0.0.1 (the receiver), with quick retries."""
    monkeypatch.setenv("VISIONTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", "true")
    monkeypatch.setenv("VISIONTUNE_WEBHOOK_RETRY_SECONDS", "0.3")
    monkeypatch.setenv("VISIONTUNE_WEBHOOK_MAX_ATTEMPTS", "3")
    get_settings.cache_clear()


def cancelled_job(client) -> str:
    dataset = upload_ready(client, colour_dataset_zip(), "colors.zip")
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100"}).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    return job["id"]


def deliveries(client, webhook_id) -> list[dict]:
    response = client.get(f"/v1/webhooks/{webhook_id}/deliveries")
    assert response.status_code == 200, response.text
    return response.json()["data"]


def due_deliveries() -> list[str]:
    """What the sweeper would send now."""
    with session_scope() as session:
        return outbox.lost(session, outbox.DELIVERY, get_settings().redispatch_seconds, 60)


@pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)  # on SQLite and a real PostgreSQL server
def test_a_delivery_is_signed_and_logged(private_allowed, client, receiver):
    created = client.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.cancelled", "job.succeeded"]})
    assert created.status_code == 201, created.text
    webhook = created.json()
    assert webhook["secret"].startswith("whsec_") and webhook["events"] == ["job.cancelled", "job.succeeded"]
    listed = client.get("/v1/webhooks").json()["data"]
    assert [w["id"] for w in listed] == [webhook["id"]] and "secret" not in listed[0]  # shown once only
    assert "secret" not in client.get(f"/v1/webhooks/{webhook['id']}").json()

    job_id = cancelled_job(client)
    [delivery] = deliveries(client, webhook["id"])
    assert (delivery["event"], delivery["status"], delivery["attempts"]) == ("job.cancelled", "pending", 0)
    assert receiver.requests == []  # nothing is sent from the request path

    assert run_delivery(delivery["id"]) == "succeeded"
    [payload] = receiver.verified(webhook["secret"])  # raises unless signed with this webhook's secret
    assert payload["type"] == "job.cancelled" and payload["data"] == {"id": job_id, "status": "cancelled"}
    assert receiver.requests[0]["headers"]["webhook-id"] == delivery["id"]
    [done] = deliveries(client, webhook["id"])
    assert (done["status"], done["attempts"], done["log"][0]["status_code"]) == ("succeeded", 1, 204)
    assert run_delivery(delivery["id"]) == "not_held"  # a duplicate message sends nothing
    assert len(receiver.requests) == 1

    with pytest.raises(Exception, match="signature"):  # another secret does not verify
        receiver.verified("whsec_" + "A" * 43)


@pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)
def test_a_failing_receiver_is_retried_with_backoff_then_the_delivery_fails_and_can_be_resent(
    private_allowed, client, receiver
):
    receiver.statuses = [500, 302, 500]  # a redirect is not followed: it counts as a failure
    webhook = client.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.cancelled"]}).json()
    cancelled_job(client)
    [delivery] = deliveries(client, webhook["id"])

    assert run_delivery(delivery["id"]) == "pending"
    pending = deliveries(client, webhook["id"])[0]
    assert pending["attempts"] == 1 and pending["log"][0]["status_code"] == 500 and pending["log"][0]["error"]
    assert run_delivery(delivery["id"]) == "not_held"  # not due yet: its backoff has not passed
    assert delivery["id"] not in due_deliveries()
    waits = []
    for attempt in (2, 3):
        started = time.monotonic()
        while delivery["id"] not in due_deliveries():  # the sweeper sends it once it is due
            time.sleep(0.05)
        waits.append(time.monotonic() - started)
        assert run_delivery(delivery["id"]) == ("pending" if attempt < 3 else "failed")
    assert waits[1] > waits[0]  # 0.3 s, then 0.6 s: it doubles
    failed = deliveries(client, webhook["id"])[0]
    assert [entry["status_code"] for entry in failed["log"]] == [500, 302, 500]
    assert failed["status"] == "failed" and failed["attempts"] == 3
    assert len(receiver.requests) == 3 and all(r["path"] == "/hooks/visiontune" for r in receiver.requests)

    resent = client.post(f"/v1/webhooks/{webhook['id']}/deliveries/{delivery['id']}/resend")
    assert resent.status_code == 200 and resent.json()["status"] == "pending"
    again = client.post(f"/v1/webhooks/{webhook['id']}/deliveries/{delivery['id']}/resend")
    assert again.status_code == 409 and again.json()["error"]["code"] == "delivery_in_progress"
    assert run_delivery(delivery["id"]) == "succeeded"
    ids = {r["headers"]["webhook-id"] for r in receiver.requests}
    assert ids == {delivery["id"]}  # every attempt and the resend: one id for the receiver to deduplicate


def test_a_receiver_that_is_down_is_logged_and_nothing_blocks(private_allowed, client):
    webhook = client.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{free_port()}/", "events": ["job.cancelled"]})
    cancelled_job(client)
    [delivery] = deliveries(client, webhook.json()["id"])
    assert run_delivery(delivery["id"]) == "pending"
    [entry] = deliveries(client, webhook.json()["id"])[0]["log"]
    assert entry["status_code"] is None and "ConnectError" in entry["error"]


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1:9/hook", "127.0.0.1, a private, loopback"),
        ("http://localhost:9/hook", "a private, loopback"),  # checked after DNS resolution
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),  # cloud metadata: link-local
        ("http://10.1.2.3/hook", "10.1.2.3"),
        ("http://[::1]:9/hook", "::1"),
        ("ftp://example.com/hook", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http:///nohost", "no host"),
    ],
)
def test_private_addresses_and_other_schemes_are_refused_by_default(client, url, reason):
    response = client.post("/v1/webhooks", json={"url": url, "events": ["job.succeeded"]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "webhook_url_refused" and reason in error["message"]
    assert client.get("/v1/webhooks").json()["data"] == []


def test_bad_events_are_422_and_another_tenants_webhooks_are_404(private_allowed, client, receiver):
    bad = client.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.finished"]})
    assert bad.status_code == 422 and "events" in bad.json()["error"]["message"]
    assert client.post("/v1/webhooks", json={"url": receiver.url, "events": []}).status_code == 422
    webhook = client.post("/v1/webhooks", json={"url": receiver.url, "events": ["dataset.ready"]}).json()
    _, other = new_tenant(client, "other")
    assert client.get(f"/v1/webhooks/{webhook['id']}", headers=other).status_code == 404
    assert client.delete(f"/v1/webhooks/{webhook['id']}", headers=other).status_code == 404
    assert client.get("/v1/webhooks", headers=other).json()["data"] == []
    # The other tenant's events are not delivered to this tenant's webhook.
    upload_ready(client, colour_dataset_zip(), "colors.zip", headers=other)
    assert deliveries(client, webhook["id"]) == []
    upload_ready(client, colour_dataset_zip(), "colors.zip")
    [ready] = deliveries(client, webhook["id"])
    assert ready["event"] == "dataset.ready" and ready["payload"]["data"]["status"] == "ready"

    assert client.delete(f"/v1/webhooks/{webhook['id']}").status_code == 204
    assert client.get(f"/v1/webhooks/{webhook['id']}").status_code == 404
    with session_scope() as session:  # its deliveries went with it
        assert session.scalars(select(WebhookDelivery)).all() == []
