"""Job API validation and the state machine, in-process (the embedded broker receives the
messages; no worker consumes them here). Training itself is covered in tests/e2e."""

import pytest

from app.jobs import runner
from tests.archives import colour_dataset_zip
from tests.uploads import upload_ready
from tests.conftest import BOTH_DATABASES

# On SQLite and on a real PostgreSQL server.
pytestmark = pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)


@pytest.fixture
def dataset_id(client) -> str:
    return upload_ready(client, colour_dataset_zip(), "colors.zip")["id"]


def test_unknown_backbone_names_the_closest_timm_models(client, dataset_id):
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_10"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "unknown_backbone" and "mobilenetv2_100" in error["message"]
    assert client.get("/v1/jobs").json()["data"] == []


def test_unknown_pretrained_tag_is_refused(client, dataset_id):
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "resnet50.no_such_tag"})
    assert response.status_code == 422 and "a1_in1k" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "hyperparameters, field",
    [
        ({"lr": -1}, "hyperparameters.lr"),
        ({"epochs": 0}, "hyperparameters.epochs"),
        ({"opt": "not_an_optimizer"}, "hyperparameters.opt"),
        ({"val_fraction": 1.5}, "hyperparameters.val_fraction"),
        ({"warmup_epochs": 5, "epochs": 3}, "warmup_epochs"),
        ({"learning_rate": 0.1}, "hyperparameters.learning_rate"),
        ({"aa": "no-such-policy"}, "hyperparameters.aa"),
        ({"class_weighting": "inverse"}, "hyperparameters.class_weighting"),
        ({"mixup": 0.2, "class_weighting": "auto"}, "class_weighting"),
        ({"early_stopping": {"metric": "top1"}}, "hyperparameters.early_stopping.metric"),
        ({"batch_size": 0}, "hyperparameters.batch_size"),
        ({"epochs": True}, "hyperparameters.epochs"),  # strict: a boolean is not a number
        ({"lr": "0.1"}, "hyperparameters.lr"),  # nor is a string
    ],
)
def test_invalid_hyperparameters_name_the_field(client, dataset_id, hyperparameters, field):
    response = client.post(
        "/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100", "hyperparameters": hyperparameters}
    )
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["message"]


def test_events_after_beyond_any_sql_integer_is_422(client, dataset_id):
    job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100"}).json()
    assert client.get(f"/v1/jobs/{job['id']}/events", params={"after": 2**70}).status_code == 422  # was a 500
    assert client.get(f"/v1/jobs/{job['id']}/events", params={"after": 0}).status_code == 200


def test_missing_dataset_is_404(client):
    response = client.post("/v1/jobs", json={"dataset_id": "ds_" + "0" * 24, "backbone": "mobilenetv2_100"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "dataset_not_found"


def test_job_records_resolved_defaults(client, dataset_id):
    job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100", "strategy": "full"})
    assert job.status_code == 202
    body = job.json()
    assert body["status"] == "queued" and (body["progress"]["epoch"], body["progress"]["epochs"]) == (0, 6)
    assert body["strategy"] == "full" and body["strategy_reason"] is None
    assert body["hyperparameters"]["lr"] == 2e-4 and body["hyperparameters"]["val_fraction"] == 0.2
    assert [e["message"] for e in client.get(f"/v1/jobs/{body['id']}/events").json()["data"]] == ["queued: full"]


def test_lr_scales_with_batch_size_and_lp_ft_counts_both_phases(client, dataset_id):
    body = client.post("/v1/jobs", json={
        "dataset_id": dataset_id, "backbone": "mobilenetv2_100", "strategy": "lp_ft",
        "hyperparameters": {"batch_size": 128, "epochs": 3, "lp_epochs": 7},
    }).json()  # fmt: skip
    assert body["hyperparameters"]["lr"] == pytest.approx(1e-4 * 2)  # adamw: sqrt(128 / 32) times the recipe's
    assert body["progress"]["epochs"] == 10


def test_auto_is_decided_by_a_worker_within_the_budget_asked(client, dataset_id):
    body = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100"}).json()
    assert (body["strategy"], body["strategy_reason"], body["progress"]["epochs"]) == ("auto", None, 0)
    assert body["search"] == {"budget_seconds": 60, "other_backbones": True}  # the defaults
    assert body["hyperparameters"]["epochs"] is None  # resolved for the strategy the worker chooses
    asked = {"dataset_id": dataset_id, "backbone": "mobilenetv2_100", "auto": {"budget_seconds": 5, "other_backbones": False}}
    assert client.post("/v1/jobs", json=asked).json()["search"] == {"budget_seconds": 5, "other_backbones": False}

    for wrong, message in [
        ({"strategy": "full", "auto": {"budget_seconds": 5}}, "apply to strategy 'auto' only"),
        ({"auto": {"budget_seconds": -1}}, "greater than or equal to 0"),
        ({"auto": {"budget": 5}}, "Extra inputs are not permitted"),
    ]:
        response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100", **wrong})
        assert response.status_code == 422 and message in response.text, response.text
    assert len(client.get("/v1/jobs").json()["data"]) == 2


def test_cancel_a_queued_job_then_its_message_does_nothing(client, dataset_id):
    job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "mobilenetv2_100"}).json()
    assert client.delete(f"/v1/datasets/{dataset_id}").json()["error"]["code"] == "dataset_in_use"

    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_cancellable"

    # The queued message reaches a worker later: the job is cancelled, so nothing runs.
    assert runner.run_job(job["id"]).status == "cancelled"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").json()["dataset_id"] is None


def test_missing_pretrained_weights_fail_the_job_saying_where_it_looked(client, dataset_id):
    # resnet18 has no file in ../shared/weights, and tests run on an empty Hub cache (conftest's empty_hub_env).
    job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "resnet18"}).json()
    assert runner.run_job(job["id"]).status == "failed"
    failed = client.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "weights_not_found"
    assert "resnet18" in failed["error"]["message"] and "Hugging Face Hub cache" in failed["error"]["message"]
    assert failed["model_id"] is None
