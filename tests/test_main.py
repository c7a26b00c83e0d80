"""Service-wide behaviour: health, readiness, OpenAPI, and the one error envelope."""


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "database": True, "broker": True, "storage": True}


def test_readiness_reports_an_unreachable_broker(settings_env, monkeypatch):
    from fastapi.testclient import TestClient

    from app.core import broker, config
    from app.main import create_app
    from tests.conftest import free_port

    monkeypatch.setenv("VISIONTUNE_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    config.get_settings.cache_clear()
    broker.get_celery.cache_clear()
    with TestClient(create_app()) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "not_ready", "database": True, "broker": False, "storage": True}


def test_openapi_documents_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/datasets", "/v1/datasets/{dataset_id}", "/v1/backbones", "/v1/jobs", "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/cancel", "/v1/models", "/v1/models/{model_id}",
        "/v1/models/{model_id}/download", "/v1/models/{model_id}/predict", "/healthz", "/readyz",
        "/v1/sweeps", "/v1/sweeps/{sweep_id}", "/v1/sweeps/{sweep_id}/promote", "/v1/models/{model_id}/embed",
        "/v1/models/{model_id}/exports", "/v1/models/{model_id}/exports/{format}",
        "/v1/models/{model_id}/exports/{format}/download", "/v1/models/{name}/aliases/{alias}",
    ):
        assert path in paths, path
    assert "multipart/form-data" in paths["/v1/datasets"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_unknown_route_and_method_use_the_envelope(client):
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    response = client.put("/v1/jobs")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_the_app_sets_its_long_lived_objects_aside_from_the_garbage_collector_while_it_runs(settings_env):
    import gc

    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()):
        assert gc.get_freeze_count() > 100_000  # PyTorch, timm, onnxruntime and FastAPI themselves
    assert gc.get_freeze_count() == 0
