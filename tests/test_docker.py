"""The container files, checked without a Docker engine (none runs on these machines): the compose
file parses, every VisionTune service runs a role the entrypoint knows, and the entrypoint is
valid shell that hands each role to the right `visiontune` command."""

import subprocess

import yaml

from tests.conftest import REPO

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def roles(role: str, stub_dir) -> str:
    """What the entrypoint runs for a role, with a stub `visiontune` on PATH that prints its arguments."""
    stub = stub_dir / "visiontune"
    stub.write_text('#!/bin/sh\necho "visiontune $*"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{stub_dir}:/usr/bin:/bin"}
    return subprocess.run(["sh", str(ENTRYPOINT), role], env=env, capture_output=True, text=True, check=True).stdout


def test_every_service_runs_a_role_the_entrypoint_knows(tmp_path):
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "background", "redis", "postgres", "minio", "minio-bucket"} <= set(services)
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)]).returncode == 0
    ours = {name: service for name, service in services.items() if service.get("image") == "visiontune:latest"}
    commands = {name: service["command"][0] for name, service in ours.items()}
    assert commands == {"api": "api", "worker": "worker", "background": "background"}
    assert roles("worker", tmp_path).strip() == "visiontune worker"
    assert roles("background", tmp_path).strip() == "visiontune worker --background"
    assert roles("api", tmp_path).splitlines() == ["visiontune migrate", "visiontune serve --host 0.0.0.0 --port 8000"]
    for name in ("worker", "background"):  # both wait for the API, which has run the migrations
        assert services[name]["depends_on"]["api"]["condition"] == "service_healthy"


def test_the_compose_services_share_nothing_but_urls():
    """PostgreSQL, Redis and the bucket the one-shot service creates; each VisionTune container
    with a cache volume of its own."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    ours = {name: service for name, service in services.items() if service.get("image") == "visiontune:latest"}
    assert set(ours) == {"api", "worker", "background"}
    for service in ours.values():
        env = service["environment"]
        assert env["VISIONTUNE_DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:" in env["VISIONTUNE_DATABASE_URL"]
        assert env["VISIONTUNE_BROKER_URL"].startswith("redis://redis:")
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        bucket = env["VISIONTUNE_STORAGE_URL"].removeprefix("s3://").split("/")[0]
        assert f"store/{bucket}" in services["minio-bucket"]["entrypoint"][-1]
        assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    caches = [service["volumes"][0].split(":")[0] for service in ours.values()]
    assert len(set(caches)) == 3, caches  # no shared data directory
    assert services["api"]["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"


def test_the_gpu_overlay_gives_each_worker_its_own_gpu():
    services = yaml.safe_load((REPO / "docker" / "compose.gpu.yml").read_text())["services"]
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["worker"]["environment"]
    gpu_workers = {name: service for name, service in services.items() if name.startswith("worker-gpu")}
    devices = [service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for service in gpu_workers.values()]
    assert len(gpu_workers) >= 1 and sorted(devices) == [[str(i)] for i in range(len(gpu_workers))]
    for service in gpu_workers.values():
        assert service["command"] == ["worker"] and service["environment"] == base  # the same URLs as every service
    assert services["worker"]["deploy"]["replicas"] == 0


def test_the_gpu_api_overlay_gives_the_api_a_gpu_and_only_settings_that_exist():
    from app.core.config import Settings

    api = yaml.safe_load((REPO / "docker" / "compose.gpu-api.yml").read_text())["services"]["api"]
    (device,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
    # Compose merges this environment into the base file's: the URLs stay, these are added.
    names = {name.removeprefix("VISIONTUNE_").lower() for name in api["environment"]}
    assert names <= set(Settings.model_fields), names
    assert int(api["environment"]["VISIONTUNE_API_WORKERS"]) > 1
