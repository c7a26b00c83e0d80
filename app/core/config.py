"""All settings in one place: environment variables prefixed VISIONTUNE_, shared by API and workers."""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VISIONTUNE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Datasets, artifacts, checkpoints and the SQLite files.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means a SQLite file in data_dir.")
    broker_url: str = Field(
        "",
        description="Celery broker URL, e.g. redis://redis:6379/0. Empty means the embedded "
        "SQLite broker (kombu's SQLAlchemy transport) in data_dir, so no external server is needed.",
    )
    storage_url: str = Field(
        "", description="Where durable bytes live: file:///DIR or s3://bucket/prefix (S3-compatible, configured by the "
        "standard AWS_* variables); empty means the data directory itself. See app/core/objects.py."
    )
    dataset_cache_bytes: int = Field(
        20 * 1024**3, gt=0, description="With a remote store: local copies of datasets a worker keeps (LRU beyond)."
    )
    artifact_cache_bytes: int = Field(
        10 * 1024**3, gt=0, description="With a remote store: local copies of model artifacts and exports (LRU beyond)."
    )
    checkpoint_upload_seconds: float = Field(
        60.0, ge=0, description="With a remote store: a job's checkpoint is sent at the end of the first epoch after "
        "each this many seconds of training (a worker that dies loses at most this much, plus the epoch under way); "
        "0: every epoch."
    )
    weights_dir: Path | None = Field(
        None, description="Local pretrained weights: <architecture>[.<tag>].safetensors files."
    )
    training_queue: str = "training"
    ingest_queue: str = "ingest"
    export_queue: str = "exports"
    audit_queue: str = "audits"
    webhook_queue: str = "webhooks"
    background_nice: int = Field(
        10, ge=0, le=19, description="How much lower the CPU priority of `visiontune worker --background` is."
    )
    training_nice: int = Field(
        5, ge=0, le=19, description="How much lower the CPU priority of a training `visiontune worker` is."
    )

    # Upload limits.
    max_upload_bytes: int = 2 * 1024**3
    max_uncompressed_bytes: int = 8 * 1024**3
    max_archive_entries: int = 200_000
    max_compression_ratio: float = 200.0
    max_image_pixels: int = 64_000_000
    min_images_per_class: int = 5

    # Every request.
    max_request_bytes: int = Field(1024**2, description="Body limit of every endpoint without a limit of its own.")
    body_idle_timeout_s: float = Field(30.0, description="A request body that sends nothing for this long gets 408.")
    body_timeout_s: float = Field(3600.0, description="A request body not complete after this long gets 408.")

    # Tenant quotas, unless set on the tenant (PATCH /v1/admin/tenants/{id}); None = no limit.
    default_max_stored_bytes: int | None = Field(None, description="Dataset and model bytes per tenant.")
    default_max_concurrent_jobs: int | None = Field(None, description="Queued + running jobs per tenant.")
    default_max_models: int | None = Field(None, description="Models per tenant, counting jobs that will make one.")

    # Prediction.
    max_predict_files: int = 64
    max_predict_bytes: int = 64 * 1024**2
    model_cache_bytes: int = Field(2 * 1024**3, description="Weights kept loaded per API process (LRU beyond).")
    # Unset: by where the forward passes run (app.serving.predictor.max_batch_size).
    max_batch_size: int | None = Field(
        None, ge=1,
        description="Micro-batching: most images in one forward pass; 1 turns it off. Unset: 8 on a CPU, 32 on a GPU.",
    )
    max_wait_ms: float = Field(5.0, description="Micro-batching: longest wait for more images to batch.")
    serving_runtime: Literal["auto", "torch", "onnxruntime", "onnxruntime-int8"] = Field(
        "auto",
        description="For models with ONNX exports: auto times PyTorch and each export (fp32, int8) at load and keeps "
        "the fastest; onnxruntime always uses the fp32 export, onnxruntime-int8 the int8 one; torch never uses an "
        "export. A model without the export asked for runs in PyTorch.",
    )
    predict_timeout_s: float = Field(
        60.0, gt=0, description="A prediction not answered this long after its body arrived gets 504."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per log line, with the request id and the job, dataset or export id."
    )
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics (GET /metrics, or METRICS_PORT).")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve the API's metrics on this port instead of GET /metrics."
    )
    worker_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="A training worker's own metrics (epochs, images/s, jobs) on this port."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="Origins of web front ends allowed to call the API from a browser, comma-separated (none by default)."
    )
    # Webhooks (app/webhooks): deliveries come from a background worker, never from a request.
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60, description="How long a receiver has to answer a delivery.")
    webhook_max_attempts: int = Field(8, ge=1, le=30, description="Attempts of a delivery before it is marked failed.")
    webhook_retry_seconds: float = Field(
        10.0, gt=0, description="The wait before a delivery's second attempt; it doubles after each failed attempt."
    )
    webhook_allow_private_addresses: bool = Field(
        False, description="Allow webhook URLs on private, loopback and link-local addresses (refused by default: SSRF)."
    )
    sse_keepalive_seconds: float = Field(15, gt=0, description="A keep-alive comment on quiet event streams this often.")
    sse_max_seconds: float = Field(
        900, gt=0, description="An event stream is closed after this long (clients reconnect with Last-Event-ID)."
    )
    api_workers: int = Field(1, ge=1, description="API processes of `visiontune serve`, each with its own model cache.")
    serving_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where PyTorch serves models: auto = the GPU when there is one (onnxruntime runs on the CPU)."
    )
    serving_inference_process: Literal["auto", "on", "off"] = Field(
        "auto",
        description="`visiontune serve` runs the forward passes of all its API processes in one inference process "
        "per GPU, where their requests share batches and one CUDA context (the API processes decode and preprocess). "
        "auto = on when serving on a GPU.",
    )
    inference_sockets: str = Field(
        "", description="Set by `visiontune serve` for its API processes: its inference processes' Unix sockets."
    )
    serving_cuda_graphs: bool = Field(
        True, description="On a GPU, replay each model's forward pass as CUDA graphs (one per batch size)."
    )
    lookup_cache_seconds: float = Field(
        1.0,
        ge=0,
        description="How long each API process keeps who an API key is and which model a reference names: a "
        "prediction then needs no database work. A key revoked, a model deleted or an alias moved takes effect at once "
        "in the API process that made the change, and within this long in the others; 0 looks up every request.",
    )
    serving_decode: Literal["auto", "api", "device"] = Field(
        "auto",
        description="Where prediction JPEGs are decoded: api = by each API process, with Pillow; device = in batches "
        "where the model runs (nvjpeg on a GPU), at pixels within a level in 255 of Pillow's "
        "(app/serving/device_decode.py); auto = device where an inference process runs the forward passes on a GPU, "
        "api elsewhere. Other formats are always decoded by the API process.",
    )

    # A running job whose worker has not reported for this long is dispatched again by the
    # sweeper (app/sweeper.py) and taken over by the worker that receives it.
    job_lease_seconds: int = Field(120, gt=0)
    sweep_interval_seconds: float = Field(10.0, gt=0, description="How often each worker's sweeper looks for lost jobs.")
    orphan_max_age_seconds: float = Field(
        3600.0, gt=0, description="Files no row owns (left by a process stopped mid-write) are removed after this long."
    )
    redispatch_seconds: int = Field(
        600, gt=0, description="A queued job whose message was sent this long ago and not taken is sent again."
    )
    # Redis transport: how long an unacknowledged message waits before it is delivered again.
    broker_visibility_timeout: int = 3600

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [origin.strip() for origin in value.split(",") if origin.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _embedded_defaults(self) -> "Settings":
        self.data_dir = self.data_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'visiontune.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        return self

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def uploads_dir(self) -> Path:
        """Archives received and waiting for their ingest (named after their dataset)."""
        return self.data_dir / "uploads"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def staging_dir(self) -> Path:
        """Uploads and artifacts in the making; moved into place only once complete."""
        return self.data_dir / "staging"


@lru_cache
def get_settings() -> Settings:
    return Settings()
