"""The server's `visiontune` commands: serve (API), worker (Celery: training, or --background for
ingests and exports), up (the API and both workers, for local use), migrate, keys."""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import uvicorn

from app.core.broker import training_queue
from app.core.config import get_settings


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def worker_argv(background: bool = False, extra: list[str] | None = None) -> list[str]:
    settings = get_settings()
    # Concurrency 1: one training job at a time on this worker's device (`--gpus 0,1` starts one
    # worker per GPU). A training worker takes the jobs for any worker and those for its kind of
    # device. A background worker takes ingests and exports, one at a time too (an ingest decodes
    # on every core already).
    if background:
        queues = f"{settings.ingest_queue},{settings.export_queue},{settings.audit_queue},{settings.webhook_queue}"
    else:
        queues = f"{training_queue('any')},{training_queue('gpu' if has_gpu() else 'cpu')}"
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--queues", queues, "--concurrency", "1", "--loglevel", "INFO",
        "--hostname", f"{'background' if background else 'training'}@%h",
        *(extra or []),
    ]  # fmt: skip


def run_worker(background: bool, extra: list[str]) -> None:
    migrate()
    settings = get_settings()
    # Below the API's CPU priority: on a machine shared with the API, training and ingests take the
    # cores that predictions leave idle, not the ones they need (on 2 cores, the first prediction of
    # a probe that `auto` serves while it searches on took 0.8-2.6 s at the same priority, 0.4 s
    # below it; bench/SPEED.md). Training sits above ingests: a running job is what someone waits for.
    os.nice(settings.background_nice if background else settings.training_nice)
    if not background and settings.worker_metrics_port:
        # Each job runs in a pool process of its own: they write their metrics to this directory,
        # and the worker's main process serves them all.
        multiprocess_metrics_dir(settings.data_dir / "metrics" / f"worker-{os.getpid()}")
    argv = worker_argv(background, extra)
    os.execv(argv[0], argv)


def multiprocess_metrics_dir(directory) -> None:
    """prometheus-client's multiprocess mode for this process's children: they write their
    metrics to files in a fresh `directory`, and whoever serves /metrics adds them up. (The
    variable must be set before any of them imports prometheus-client.)"""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def migrate() -> None:
    from app.db.migrate import upgrade_to_head

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.database_url)


def create_key(tenant_name: str, scopes: list[str], name: str) -> str:
    """A new key for the tenant (created if it does not exist yet); the key is returned once."""
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.db.tables import Tenant
    from app.tenants import service

    migrate()
    with session_scope() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
        if tenant is None:
            tenant = service.create_tenant(session, tenant_name)
        _, key = service.create_key(session, tenant, name, scopes)
    return key


def first_key_if_none() -> str | None:
    """Never an open server: the first start creates an admin key for tenant "default"."""
    from app.core.db import session_scope
    from app.tenants.service import any_active_key

    with session_scope() as session:
        if any_active_key(session):
            return None
    return create_key("default", ["admin", "operator"], "first key, created by visiontune up")


def serve(host: str, port: int, workers: int | None = None) -> None:
    """The API in `workers` processes (default VISIONTUNE_API_WORKERS): one Python process runs its
    request handling on one core at a time (the GIL), so a machine with cores to spare serves more
    with more processes. Each has its own model cache and micro-batcher, unless inference processes
    (one per GPU, VISIONTUNE_SERVING_INFERENCE_PROCESS) run the forward passes of all of them."""
    from app.serving.inference_process import inference_devices, inference_processes

    settings = get_settings()
    workers = workers or settings.api_workers
    os.environ["VISIONTUNE_API_WORKERS"] = str(workers)  # each process takes its share of the cores
    devices = inference_devices(settings)
    if workers > 1 or devices:
        migrate()  # once, before the processes race to do it
        if settings.metrics_enabled:  # one /metrics for all the processes: each writes its own files here
            multiprocess_metrics_dir(settings.data_dir / "metrics" / f"api-{os.getpid()}")
    with inference_processes(devices) as sockets:
        os.environ["VISIONTUNE_INFERENCE_SOCKETS"] = ",".join(sockets)
        get_settings.cache_clear()  # an API process in this one (workers=1) reads the sockets too
        uvicorn.run("app.main:app", host=host, port=port, workers=workers, log_level="info")


def up(host: str, port: int) -> int:
    """Run the API, a training worker and a background worker as child processes, and stop them all
    when one stops or when this process is told to. (Children, because uvicorn ends its own process
    with the signal it was stopped by, which would leave a worker started from inside it behind.)"""
    migrate()  # once, before two processes race to do it
    key = first_key_if_none()
    if key:
        print(f"\nFirst API key (tenant 'default', scopes admin and operator). It is shown only this once; store it:\n\n"
              f"    {key}\n\nSend it as `Authorization: Bearer <key>`; more keys: POST /v1/admin/tenants/{{id}}/keys "
              f"or `visiontune keys create`.\n", flush=True)  # fmt: skip
    cli = [sys.executable, "-m", "app.cli"]
    api = [*cli, "serve", "--host", host, "--port", str(port)]
    return supervise([subprocess.Popen(argv) for argv in ([*cli, "worker"], [*cli, "worker", "--background"], api)])


def gpu_workers(gpus: list[str], extra: list[str]) -> int:
    """One training worker per listed GPU, each seeing only its own (CUDA_VISIBLE_DEVICES)."""
    migrate()  # once, before they race to do it
    cli = [sys.executable, "-m", "app.cli", "worker"]
    return supervise([
        subprocess.Popen([*cli, "--", "--hostname", f"training-gpu{gpu}@%h", *extra],
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})
        for gpu in gpus
    ])  # fmt: skip


def supervise(children: list[subprocess.Popen]) -> int:
    """Wait while all the children run; stop them all when one stops or this process is told to."""

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    requested = False
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except (KeyboardInterrupt, SystemExit):
        requested = True
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
    # A stop that was asked for is a success; otherwise report the child that ended first.
    return 0 if requested else next(child.returncode for child in children if child.returncode is not None) or 1


def register(commands: argparse._SubParsersAction) -> None:
    """Add the server's commands to `visiontune`: the client CLI (visiontune_client.cli) calls this
    through the entry-point group `visiontune.commands`, and `main` below for `python -m app.cli`."""
    for name, help_text, run in (("serve", "run the HTTP API", _serve), ("up", "run the API and its workers together", _up)):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--host", default="127.0.0.1")
        command.add_argument("--port", type=int, default=8000)
        command.set_defaults(run=run)
    serve_command = commands.choices["serve"]
    serve_command.add_argument("--workers", type=int, help="API processes (default: VISIONTUNE_API_WORKERS, 1)")
    worker = commands.add_parser("worker", help="run a Celery worker: training, or --background")
    worker.add_argument("--background", action="store_true", help="take dataset ingests and model exports "
                        "(queues ingest, exports) at a lower CPU priority, instead of training jobs")  # fmt: skip
    worker.add_argument("--gpus", help="comma-separated GPU indices: one training worker per GPU, e.g. 0,1")
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="extra arguments for `celery worker`, after --")
    worker.set_defaults(run=_worker)
    commands.add_parser("migrate", help="apply database migrations").set_defaults(run=lambda _: migrate())
    keys = commands.add_parser("keys", help="API keys, on the server itself (e.g. the first admin key)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it (shown only this once)")
    create.add_argument("--tenant", default="default", help="tenant name; created if it does not exist")
    create.add_argument("--scopes", default="admin", help="comma-separated: read, train, predict, admin "
                        "(the tenant's own administrator), operator")  # fmt: skip
    create.add_argument("--operator", action="store_true", help="add the operator scope: tenants, quotas, "
                        "every tenant's keys (the platform's administrator, not a tenant's)")  # fmt: skip
    create.add_argument("--name", default="", help="a note to recognise the key by")
    create.set_defaults(run=_keys_create, parser=create)


def _serve(args: argparse.Namespace) -> None:
    serve(args.host, args.port, args.workers)


def _up(args: argparse.Namespace) -> int:
    return up(args.host, args.port)


def _worker(args: argparse.Namespace) -> int | None:
    extra = args.celery_args[1:] if args.celery_args[:1] == ["--"] else args.celery_args  # `-- --opt` passes --opt
    if args.gpus:
        return gpu_workers([gpu.strip() for gpu in args.gpus.split(",") if gpu.strip()], extra)
    run_worker(args.background, extra)
    return None


def _keys_create(args: argparse.Namespace) -> None:
    from app.tenants.schemas import KeyCreate, TenantCreate

    scopes = [scope.strip() for scope in args.scopes.split(",") if scope.strip()] + ["operator"] * args.operator
    try:  # the same validation as the admin API
        TenantCreate(name=args.tenant)
        KeyCreate(name=args.name, scopes=scopes)
    except ValueError as exc:
        args.parser.error(str(exc))
    print(create_key(args.tenant, scopes, args.name))


def main(argv: list[str] | None = None) -> None:
    """The server's commands alone (`python -m app.cli`); `visiontune` has them beside the client's."""
    parser = argparse.ArgumentParser(prog="visiontune", description=__doc__)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.run(args)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
