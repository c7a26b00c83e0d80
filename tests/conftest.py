"""Shared fixtures: the real data in ../shared, an in-process app on a temporary data directory,
and real server processes (redis-server, uvicorn, celery worker) on free ports."""

import contextlib
import glob
import os
import secrets
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.archives import zip_tree

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
WEIGHTS_DIR = SHARED / "weights"
MOBILENET_WEIGHTS = WEIGHTS_DIR / "mobilenetv2_100.tv_in1k.safetensors"
EFFICIENTNET_WEIGHTS = WEIGHTS_DIR / "tf_efficientnet_lite0.in1k.safetensors"


def pytest_sessionstart(session):
    # Transfer-learning tests need the real weights and images; in CI they must never be skipped.
    missing = [p for p in (HYMENOPTERA, MOBILENET_WEIGHTS) if not p.exists()]
    if missing:
        pytest.exit(f"missing shared data: {missing} (expected ../shared beside the checkout)", returncode=3)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def hymenoptera_zip(tmp_path_factory) -> Path:
    return zip_tree(HYMENOPTERA, tmp_path_factory.mktemp("archives") / "hymenoptera.zip")


@pytest.fixture(scope="session")
def small_hymenoptera_zip(tmp_path_factory) -> Path:
    """12 train and 8 val images per class: for tests where the point is the path, not accuracy."""
    return zip_tree(
        HYMENOPTERA, tmp_path_factory.mktemp("archives") / "small.zip", per_class={"train": 12, "val": 8}
    )


def empty_hub_env(root: Path) -> dict[str, str]:
    """Environment variables for an empty, offline Hugging Face cache under `root`.

    Weight lookups fall back to the Hub cache (app/backbones/service.py), so a test that expects a
    backbone to have no weights (resnet18) would pass or fail with whatever the user's own
    ~/.cache/huggingface holds. Every test, and every server process a test starts, gets this instead.
    """
    home = root / "huggingface"
    (home / "hub").mkdir(parents=True, exist_ok=True)
    hub = str(home / "hub")
    return {"HF_HOME": str(home), "HF_HUB_CACHE": hub, "HUGGINGFACE_HUB_CACHE": hub, "HF_HUB_OFFLINE": "1"}


def _isolate_hub(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Point this process at an empty Hub cache: the environment (inherited by subprocesses) and
    huggingface_hub's constants, which it reads from the environment once, at import."""
    import huggingface_hub.constants

    env = empty_hub_env(root)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", env["HF_HOME"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session", autouse=True)
def empty_hub_cache(tmp_path_factory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate_hub(monkeypatch, tmp_path_factory.mktemp("hf"))
        yield


def _clear_caches() -> None:
    from app.core import broker, config, db, objects

    for cached in (config.get_settings, db.get_engine, db._session_factory, broker.get_celery, objects.get_store):
        cached.cache_clear()


# For tests that run on both databases: @pytest.mark.parametrize("database_url", BOTH_DATABASES,
# indirect=True). The PostgreSQL runs start a server, so they are e2e (`make test-fast` skips them).
BOTH_DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)]


@pytest.fixture
def database_url(request) -> str:
    """"" for the embedded SQLite default, or a fresh database on the test PostgreSQL server."""
    if getattr(request, "param", "sqlite") == "postgresql":
        return request.getfixturevalue("postgres_database")
    return ""


@pytest.fixture
def settings_env(tmp_path, monkeypatch, database_url) -> Path:
    """Point the in-process settings at a fresh data directory (embedded SQLite DB and broker, or
    the PostgreSQL database of `database_url`)."""
    data_dir = tmp_path / "var"
    monkeypatch.setenv("VISIONTUNE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("VISIONTUNE_WEIGHTS_DIR", str(WEIGHTS_DIR))
    for name in ("VISIONTUNE_DATABASE_URL", "VISIONTUNE_BROKER_URL", "VISIONTUNE_STORAGE_URL"):
        monkeypatch.delenv(name, raising=False)
    if database_url:
        monkeypatch.setenv("VISIONTUNE_DATABASE_URL", database_url)
    _isolate_hub(monkeypatch, tmp_path)  # a fresh, empty Hub cache for each test
    _clear_caches()
    yield data_dir
    if data_dir.exists():
        served_predictions_reproduce_reported_accuracy()
    _clear_caches()


def served_predictions_reproduce_reported_accuracy() -> None:
    """After every test: each model a job of the test trained, loaded and run exactly as the
    prediction endpoint does, on its job's validation images, gets the validation accuracy that
    its job reported, image for image. A job that reports metrics of a model other than the one
    served (another input size, another tag's preprocessing, bf16 where serving runs fp32) fails
    here, whatever the test was about."""
    from sqlalchemy import select

    from app.core.config import get_settings
    from app.core.db import session_scope
    from app.db.tables import Dataset, Job, Model
    from app.jobs.service import data_split
    from app.models.service import local_artifact, local_exports
    from app.serving.predictor import ModelCache, preprocess

    settings = get_settings()
    with session_scope() as session:
        trained = session.execute(
            select(Model, Job).join(Job, Job.id == Model.job_id).join(Dataset, Dataset.id == Job.dataset_id)
        ).all()
        for model, job in trained:
            _, val = data_split(session, settings, job)
            cache = ModelCache(2**40, 8, 0.0, settings.serving_runtime)
            loaded = cache.get(model.id, local_artifact(settings, model.id), local_exports(settings, model.id))
            correct = 0
            for start in range(0, len(val), 16):
                batch = val[start : start + 16]
                pixels = preprocess(loaded, [(path.name, path.read_bytes()) for path, _ in batch], settings.max_image_pixels)
                predicted = loaded.probabilities(pixels).argmax(dim=1).tolist()
                correct += sum(p == label for p, (_, label) in zip(predicted, batch))
            loaded.batcher.close()
            reported = model.metrics["val_accuracy"]
            assert correct == round(reported * len(val)), (
                f"model {model.id} ({job.strategy}, {job.backbone}, {job.hyperparameters.get('img_size')}): served "
                f"predictions get {correct}/{len(val)} right, its job reported val_accuracy {reported}")


@pytest.fixture
def client(settings_env):
    from fastapi.testclient import TestClient

    from app.cli import create_key
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        # The platform operator's key, as `visiontune up` prints it (tenant admin and operator).
        test_client.headers["Authorization"] = f"Bearer {create_key('default', ['admin', 'operator'], 'tests')}"
        yield test_client


# Whether the test being set up or run is marked e2e: `pytest -m "not e2e"` (make test-fast) must
# start no server process, so Process refuses to start one for an unmarked test.
_e2e_test_running = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _e2e_test_running
    _e2e_test_running = item.get_closest_marker("e2e") is not None


class Process:
    """A real server process whose output goes to a log file shown when a test fails."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        if not _e2e_test_running:
            raise RuntimeError(f"{name}: a test that starts server processes must be marked @pytest.mark.e2e")
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._log_file = self.log.open("wb")
        # A process group of its own: a fault test can kill the process with all its children.
        self.popen = subprocess.Popen(argv, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=REPO,
                                      start_new_session=True)  # fmt: skip
        self._terminated = False

    def terminate(self) -> None:
        """SIGTERM without waiting, so that several processes shut down side by side (a Celery
        worker's warm shutdown takes about 6 s here); stop() then waits."""
        if not self._terminated and self.popen.poll() is None:
            self.popen.terminate()
        self._terminated = True

    def stop(self) -> None:
        self.terminate()
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self.kill_group()  # whatever it started and left behind
        self._log_file.close()

    def kill_group(self) -> None:
        """SIGKILL the process and everything it started (its process group), as a lost machine."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def is_ready(http: httpx.Client) -> bool:
    """The API answers /readyz with 200 (database and broker reachable)."""
    try:
        return http.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5, processes=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.popen.poll() is not None:
                raise AssertionError(f"{process.name} exited while waiting for {what}:\n{process.tail()}")
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in processes)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    log_dir = tmp_path_factory.mktemp("redis")
    process = Process(
        "redis",
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(log_dir)],
        dict(os.environ),
        log_dir,
    )
    import redis

    client = redis.Redis(port=port)
    wait_until(lambda: _ping(client), 20, "redis-server", processes=[process])
    yield f"redis://127.0.0.1:{port}/0"
    process.stop()


def _postgres_program(name: str) -> str:
    """Debian keeps PostgreSQL's server programs off PATH, under /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        pytest.fail("PostgreSQL is not installed (apt-get install -y postgresql)")
    return found


def _as_postgres_user(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user Debian's package makes."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL server for this test session: a private data directory, a free port on
    127.0.0.1, fsync off (a test server); the SQLAlchemy URL of its server, without a database."""
    root = Path(tempfile.mkdtemp(prefix="visiontune-postgres-"))
    root.chmod(0o755)
    data = root / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    initdb = _as_postgres_user([_postgres_program("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                "-E", "UTF8", "--no-sync"])  # fmt: skip
    subprocess.run(initdb, check=True, capture_output=True)
    port = free_port()
    server = _as_postgres_user([_postgres_program("postgres"), "-D", str(data), "-p", str(port), "-k", str(data),
                                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=300"])  # fmt: skip
    process = Process("postgres", server, dict(os.environ), root)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    wait_until(lambda: _postgres_answers(port), 60, "postgres", processes=[process])
    yield url
    process.stop()
    shutil.rmtree(root, ignore_errors=True)


def _postgres_answers(port: int) -> bool:
    import psycopg

    try:
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2).close()
        return True
    except psycopg.OperationalError:
        return False


@pytest.fixture
def postgres_database(postgres_server) -> Iterator[str]:
    """A fresh, empty database on the test server, dropped afterwards; its SQLAlchemy URL."""
    import psycopg

    name = f"test_{secrets.token_hex(6)}"
    admin = postgres_server.replace("postgresql+psycopg", "postgresql") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    yield f"{postgres_server}/{name}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE {name} WITH (FORCE)")


class S3Server:
    """moto's S3 server: the real S3 HTTP API on 127.0.0.1 (no Docker); `env` configures a client
    exactly as the standard AWS variables would on a real deployment."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        server = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = Process("moto", server, dict(os.environ), log_dir)
        wait_until(self._answers, 60, "the S3 server", processes=[self.process])

    def _answers(self) -> bool:
        try:
            return httpx.get(self.env["AWS_ENDPOINT_URL"], timeout=2).status_code < 500
        except httpx.TransportError:
            return False

    def new_bucket(self) -> str:
        """A fresh bucket; its name."""
        import boto3

        name = f"test-{secrets.token_hex(6)}"
        boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                     aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket=name)  # fmt: skip
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto"))
    yield server
    server.process.stop()


@pytest.fixture
def s3_storage(s3_server, settings_env, monkeypatch) -> str:
    """This test's settings on a fresh bucket of the S3 server; the STORAGE_URL. (Ask for it
    before `client`, so that the app starts on it.)"""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    url = f"s3://{s3_server.new_bucket()}/visiontune"
    monkeypatch.setenv("VISIONTUNE_STORAGE_URL", url)
    _clear_caches()
    return url


def _ping(client) -> bool:
    try:
        return client.ping()
    except Exception:
        return False


class Stack:
    """A uvicorn API and Celery workers (training, background) sharing one data directory and broker."""

    def __init__(self, data_dir: Path, broker_url: str | None, log_dir: Path, env_extra: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "VISIONTUNE_DATA_DIR": str(data_dir),
            "VISIONTUNE_WEIGHTS_DIR": str(WEIGHTS_DIR),
            "PYTHONUNBUFFERED": "1",
            **empty_hub_env(log_dir),  # weights come from WEIGHTS_DIR only, never the user's Hub cache
            **(env_extra or {}),
        }
        if broker_url:
            self.env["VISIONTUNE_BROKER_URL"] = broker_url
        self.data_dir, self.log_dir = data_dir, log_dir
        self.processes: list[Process] = []
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def create_key(self, tenant: str = "default", scopes: str = "admin,operator") -> str:
        """`visiontune keys create` on this stack's database, as an operator would run it."""
        argv = [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", tenant, "--scopes", scopes]
        return subprocess.run(argv, env=self.env, check=True, capture_output=True, text=True).stdout.strip()

    def start_api(self) -> None:
        cli = [sys.executable, "-m", "app.cli"]
        self.http.headers["Authorization"] = f"Bearer {self.create_key()}"
        self.processes.append(Process("api", [*cli, "serve", "--port", str(self.port)], self.env, self.log_dir))
        wait_until(self._healthy, 60, "the API", processes=self.processes)

    def start_worker(self, name: str = "worker", background: bool = False) -> Process:
        """A training worker, or a background worker (ingests and exports)."""
        argv = [sys.executable, "-m", "app.cli", "worker", *(["--background"] if background else [])]
        self.processes.append(Process(name, argv, self.env, self.log_dir))
        return self.processes[-1]

    def _healthy(self) -> bool:
        return is_ready(self.http)

    def wait_job(self, job_id: str, timeout: float = 600) -> dict:
        def finished():
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        return wait_until(finished, timeout, f"job {job_id}", interval=1.0, processes=self.processes)

    def wait_dataset(self, dataset_id: str, timeout: float = 300) -> dict:
        """The dataset once its ingest is over (ready or failed)."""

        def finished():
            dataset = self.http.get(f"/v1/datasets/{dataset_id}").json()
            return dataset if dataset["status"] != "processing" else None

        return wait_until(finished, timeout, f"dataset {dataset_id}", interval=0.5, processes=self.processes)

    def upload(self, archive: Path) -> dict:
        """POST an archive (streamed from disk) and wait for its ingest; the dataset, ready."""
        with archive.open("rb") as file:
            response = self.http.post("/v1/datasets", files={"file": (archive.name, file, "application/zip")})
        assert response.status_code == 202, response.text
        dataset = self.wait_dataset(response.json()["id"])
        assert dataset["status"] == "ready", dataset
        return dataset

    def wait_export(self, model_id: str, timeout: float = 300) -> dict:
        def finished():
            export = self.http.get(f"/v1/models/{model_id}/exports/onnx").json()
            return export if export["status"] != "processing" else None

        return wait_until(finished, timeout, f"the export of {model_id}", interval=0.5, processes=self.processes)

    def stop(self) -> None:
        self.http.close()
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.stop()


def start_stack(tmp_path_factory, broker_url: str | None, **env) -> Stack:
    root = tmp_path_factory.mktemp("stack")
    stack = Stack(root / "var", broker_url, root, env)
    stack.start_api()
    stack.start_worker()
    stack.start_worker("background", background=True)
    return stack
