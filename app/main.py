"""create_app(): routers, the one error envelope, and the lifespan (database, model cache)."""

import gc
import logging
import os
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.registry import Collector

from app.backbones.router import router as backbones_router
from app.console.router import console_files
from app.console.router import router as console_router
from app.core import logs, metrics
from app.core.broker import broker_reachable, queue_depths
from app.core.config import get_settings
from app.core.db import get_engine, session_scope
from app.core.errors import AppError, ErrorBody
from app.core.limits import BodyTimeoutMiddleware
from app.core.lookups import CachedLookup
from app.core.objects import get_store
from app.datasets.router import router as datasets_router
from app.db.migrate import upgrade_to_head
from app.jobs.router import router as jobs_router
from app.jobs.usage import jobs_by_status
from app.models.dependencies import find_model
from app.models.router import router as models_router
from app.serving.router import router as serving_router
from app.serving.service import Serving
from app.sweeps.router import router as sweeps_router
from app.tenants.router import router as tenants_router
from app.tenants.service import lookup_key
from app.webhooks.router import router as webhooks_router

logger = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, details: list | None = None, headers: dict | None = None) -> JSONResponse:
    content = {"error": {"code": code, "message": message, "details": details or []}}
    return JSONResponse(status_code=status, content=content, headers=headers)


def operation_id(route: APIRoute) -> str:
    """Clean operation ids, which generated clients turn into method names: `jobs-create` rather
    than FastAPI's default `create_job_v1_jobs_post` (the router's tag, then the function's name
    without the tag's noun)."""
    tag = route.tags[0] if route.tags else "default"
    words = [w for w in route.name.split("_") if w not in (tag, tag.removesuffix("s"))]
    return "-".join([tag, *(words or [route.name])])


def _allowed_methods(request: Request) -> list[str]:
    """Every method the OpenAPI document lists for this path (Starlette's own 405 names only the
    first route whose path matches)."""
    paths = request.app.openapi()["paths"]
    matching = [ops for template, ops in paths.items() if compile_path(template)[0].match(request.scope["path"])]
    return sorted({method.upper() for ops in matching for method in ops})


class ErrorEnvelope(BaseModel):
    error: ErrorBody


# Documented on every operation, so that clients (and schemathesis) know every error's shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": description}
    for status, description in {
        400: "The request body could not be parsed (e.g. not UTF-8 JSON)",
        401: "Missing or invalid API key",
        403: "The API key lacks the scope this endpoint needs",
        404: "Not found (or not this tenant's)",
        408: "The request body was too slow",
        409: "Conflict with the current state",
        413: "Request body too large",
        415: "Unsupported media type",
        422: "Invalid request",
        429: "A tenant quota would be exceeded",
        503: "A dependency (broker, database) is unavailable",
        504: "The server's own deadline for the request passed (predictions)",
        507: "The server has no room to store the upload",
    }.items()
}


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    logs.configure(settings.log_format)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for directory in (settings.staging_dir, settings.datasets_dir, settings.models_dir):
        directory.mkdir(exist_ok=True)
    await run_in_threadpool(upgrade_to_head, settings.database_url)
    app.state.serving = Serving(settings)
    metrics_server = None
    if settings.metrics_enabled and settings.metrics_port is not None:
        metrics_server, _ = start_http_server(settings.metrics_port, registry=app.state.metrics)
    # What is imported and built by now (PyTorch, timm, onnxruntime, FastAPI: hundreds of thousands
    # of objects) lives as long as the process: set it aside from the garbage collector. Otherwise
    # every few hundred predictions a full collection walks all of it holding the GIL, and every
    # request in flight waits for it (bench/serve_load.py's p99 shows it).
    gc.freeze()
    yield
    gc.unfreeze()
    if metrics_server is not None:
        metrics_server.shutdown()
    get_engine().dispose()


def _jobs_by_status() -> dict[str, int]:
    with session_scope() as session:
        return jobs_by_status(session)


def metrics_registry() -> CollectorRegistry:
    """This process's metrics and the ones read at scrape time, in one registry."""
    state = metrics.StateCollector(_jobs_by_status, queue_depths)

    class Everything(Collector):
        def collect(self):
            yield from REGISTRY.collect()
            yield from state.collect()

    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several API processes: the sum of all of theirs
        multiprocess.MultiProcessCollector(registry)
        registry.register(state)
    else:
        registry.register(Everything())
    return registry


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="VisionTune",
        version="0.1.0",
        summary="Fine-tune pretrained timm image backbones on your own data and serve them.",
        lifespan=lifespan,
        # Every endpoint's body limit; uploads and predictions declare their own larger ones.
        max_body_size=settings.max_request_bytes,
        responses=ERROR_RESPONSES,
        generate_unique_id_function=operation_id,
    )
    if settings.cors_origins:  # web front ends on other origins; none by default
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID"],
            max_age=600,
        )
    app.add_middleware(BodyTimeoutMiddleware, idle_timeout=settings.body_idle_timeout_s,
                       total_timeout=settings.body_timeout_s)  # fmt: skip
    # app.core.auth asks the tenants domain who a key is; predictions ask the registry for their model
    app.state.key_lookup = CachedLookup(lookup_key, settings.lookup_cache_seconds)
    app.state.model_lookup = CachedLookup(find_model, settings.lookup_cache_seconds)
    if settings.metrics_enabled:
        app.add_middleware(metrics.HttpMetrics)
        app.state.metrics = metrics_registry()
        if settings.metrics_port is None:

            @app.get("/metrics", include_in_schema=False)
            def prometheus_metrics() -> Response:
                """Prometheus text format; no tenant key (it names no tenant's objects)."""
                return Response(generate_latest(app.state.metrics), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(logs.RequestIds)  # outermost: every log line of the request carries its id

    routers = (datasets_router, backbones_router, jobs_router, models_router, serving_router, sweeps_router, tenants_router,
               webhooks_router)  # fmt: skip
    for router in routers:
        app.include_router(router)
    app.include_router(console_router)  # / -> the web console
    app.mount("/console", console_files(), name="console")

    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return _error(exc.status_code, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        fields = ", ".join(".".join(str(p) for p in e["loc"] if p != "body") for e in errors)
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
        return _error(422, "validation_error", f"Invalid request: {fields}: {errors[0]['msg']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code, "http_error"
        )
        message, headers = str(exc.detail), exc.headers
        if exc.status_code == 405:
            headers = {"Allow": ", ".join(_allowed_methods(request))}
        if exc.status_code == 413:
            message = f"The request body is larger than this endpoint accepts ({settings.max_request_bytes} bytes)."
        if exc.status_code == 404 and message == "Not Found":  # no such route, rather than no such object
            message = f"No endpoint {request.method} {request.url.path} here: is the API's base URL right?"
        return _error(exc.status_code, code, message, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return _error(500, "internal_error", "Internal server error.")

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        try:
            with get_engine().connect() as connection:
                connection.execute(text("SELECT 1"))
            database = True
        except Exception:
            database = False
        broker = broker_reachable()
        try:
            get_store().check()
            storage, reason = True, None
        except Exception as exc:  # unreachable, refused credentials, no such bucket or directory
            storage, reason = False, str(exc)
        ready = database and broker and storage
        content = {"status": "ready" if ready else "not_ready", "database": database, "broker": broker, "storage": storage}
        return JSONResponse(status_code=200 if ready else 503, content=content | ({"storage_error": reason} if reason else {}))

    return app


app = create_app()
