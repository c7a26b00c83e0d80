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
        "/v1/datasets/{dataset_id}/images", "/v1/datasets/{dataset_id}/images/{path}",
        "/v1/models/{model_id}/validation-predictions",
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


def test_operation_ids_are_clean_and_unique(client):
    """Generated clients name their methods after operation ids: `jobs-create`, not FastAPI's
    default `create_job_v1_jobs_post`."""
    ids = [op["operationId"] for ops in client.get("/openapi.json").json()["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert {"jobs-create", "jobs-get", "jobs-list-events", "datasets-upload", "models-predict"} <= set(ids)
    assert not [i for i in ids if "_v1_" in i or i.endswith(("_get", "_post"))]


def test_cors_is_off_by_default_and_answers_the_configured_origins(settings_env, monkeypatch, client):
    from fastapi.testclient import TestClient

    from app.core import config
    from app.main import create_app

    preflight = {"Origin": "https://console.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    assert "access-control-allow-origin" not in client.options("/v1/jobs", headers=preflight).headers

    monkeypatch.setenv("VISIONTUNE_CORS_ORIGINS", "https://console.example, http://localhost:5173")
    config.get_settings.cache_clear()
    with TestClient(create_app()) as cors:
        answer = cors.options("/v1/jobs", headers=preflight)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://console.example"
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        assert "POST" in answer.headers["access-control-allow-methods"]
        other = cors.options("/v1/jobs", headers=preflight | {"Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        # A real request from the allowed origin: the browser may read the answer (here, the 401 envelope).
        response = cors.get("/v1/jobs", headers={"Origin": "http://localhost:5173"})
        assert response.status_code == 401
        assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
