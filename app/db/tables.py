"""ORM tables. Named "tables" so that "model" always means a trained model."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Integer, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend (SQLite stores no zone and hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}


class Tenant(Base):
    """A team or service whose datasets, jobs and models are its own. Quotas: None = the server default."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer)
    max_models: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Written by every quota check before it counts: the write serialises concurrent checks of
    # one tenant (a row lock on PostgreSQL, the database write lock on SQLite).
    usage_checked_at: Mapped[datetime | None] = mapped_column()


class ApiKey(Base):
    """Only a hash of the key is stored; `prefix` (shown in listings) finds the row."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(20), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class BackgroundWork:
    """The columns of a row that a background worker processes through the outbox
    (app/core/outbox.py): its holder, the holder's heartbeat, when its message was sent, and once
    finished, when, and the error {"code", "message", "details"} if it failed."""

    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    claimed_by: Mapped[str | None] = mapped_column(String(300))
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    dispatched_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class Dataset(BackgroundWork, Base):
    """An uploaded archive: `processing` until a worker has ingested it (app/datasets/runner.py),
    then `ready` or `failed` with the reasons."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)
    num_images: Mapped[int] = mapped_column(Integer, default=0)
    classes: Mapped[list[Any]] = mapped_column(default=list)  # [{"name", "train", "val"}] in label order
    has_val_split: Mapped[bool] = mapped_column(default=False)
    sha256: Mapped[str] = mapped_column(String(64))
    # Once ready: the object-store prefix of its images, named after their content, so a dataset
    # version is immutable and identical uploads share one copy ("datasets/<sha256>").
    content_key: Mapped[str | None] = mapped_column(String(100), index=True)
    archive_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # the upload as received
    # What it takes of the tenant's storage quota: the archive while it waits, its declared
    # uncompressed size while it is extracted, the images kept once ready, nothing once failed.
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    warnings: Mapped[list[Any]] = mapped_column(default=list)


class Sweep(Base):
    """Several backbones ranked on one dataset: each row is a linear-probe job."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    backbones: Mapped[list[Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    # Jobs outlive their dataset: deleting a dataset keeps the job history.
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    backbone: Mapped[str] = mapped_column(String(200))
    strategy: Mapped[str] = mapped_column(String(30))
    strategy_reason: Mapped[str | None] = mapped_column(Text)  # why "auto" chose it
    # "auto" only: its options, then what it measured (app/ml/auto.py); strategy stays "auto" until then.
    search: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    model_name: Mapped[str | None] = mapped_column(String(100))  # name for the model it produces
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id", ondelete="SET NULL"), index=True)
    pretrained: Mapped[bool] = mapped_column()
    accelerator: Mapped[str] = mapped_column(String(10), default="any")  # any | gpu | cpu: which workers take it
    hyperparameters: Mapped[dict[str, Any]] = mapped_column()
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), index=True)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    # Within the current phase, as the worker last reported it: phase, step, steps, images_per_second,
    # eta_seconds (app/jobs/runner.py's reporter).
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error_code: Mapped[str | None] = mapped_column(String(60))
    error_message: Mapped[str | None] = mapped_column(Text)
    # "host:pid" of the worker process that holds the job, and when it last reported.
    claimed_by: Mapped[str | None] = mapped_column(String(300))
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When its message was last sent: the sweeper sends it again if it was never sent, or was
    # sent long ago and the job is still queued (app/core/outbox.py).
    dispatched_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Model(Base):
    __tablename__ = "models"
    # One model per (job, backbone, strategy) and one per (tenant, name, version), enforced by the
    # database. A job makes one model, or two with `auto`: the requested backbone's linear probe,
    # served while the search goes on, then the winner if another candidate beat it.
    __table_args__ = (
        UniqueConstraint("job_id", "backbone", "strategy", name="uq_models_job_backbone_strategy"),
        UniqueConstraint("tenant_id", "name", "version", name="uq_models_tenant_name_version"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"))
    dataset_id: Mapped[str] = mapped_column(String(40))
    backbone: Mapped[str] = mapped_column(String(200))
    strategy: Mapped[str] = mapped_column(String(20))
    classes: Mapped[list[Any]] = mapped_column()
    metrics: Mapped[dict[str, Any]] = mapped_column()
    preprocessing: Mapped[dict[str, Any]] = mapped_column()
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Each validation image of its job as the kept weights predicted it: [{"path", "label",
    # "predicted", "confidence"}] in the split's order; None for models registered before 0013.
    # Deferred: a list as long as the validation split, read only by its own endpoint, never by
    # the lookups every prediction makes.
    validation: Mapped[list[Any] | None] = mapped_column(JSON, deferred=True)


class Export(BackgroundWork, Base):
    """A model in another format (ONNX), built by a worker: `processing`, then `ready` with its
    parity report or `failed` with the reasons. One per model and format, by the database."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("model_id", "format", name="uq_exports_model_format"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    format: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    parity: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Audit(BackgroundWork, Base):
    """A dataset's audit through one backbone's features (app/ml/audit.py), computed by a worker:
    `processing`, then `ready` with its findings or `failed`. One per dataset and backbone."""

    __tablename__ = "audits"
    __table_args__ = (UniqueConstraint("dataset_id", "backbone", name="uq_audits_dataset_backbone"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    backbone: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ModelName(Base):
    """The last version number a model name has given out: numbers are never reused, even after
    the latest version is deleted."""

    __tablename__ = "model_names"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer)


class Lease(Base):
    """A named lease held by one process until it expires (e.g. the jobs sweeper): a crashed
    holder's lease simply runs out."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str] = mapped_column(String(300))
    expires_at: Mapped[datetime] = mapped_column()


class ModelAlias(Base):
    """A movable pointer such as `production` from a model name to one of its versions."""

    __tablename__ = "model_aliases"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Webhook(Base):
    """A tenant's endpoint for event notifications (app/webhooks): the `secret` signs every delivery
    (Standard Webhooks), so it is kept as given out (shown once; signing needs it, a hash would not do)."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list[Any]] = mapped_column(JSON)
    description: Mapped[str | None] = mapped_column(String(500))
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(BackgroundWork, Base):
    """One event for one webhook, sent by a worker (app/webhooks/runner.py): `pending` (waiting for
    its next attempt, at `next_attempt_at`), `sending` while a worker holds it, then `succeeded` or
    `failed` once its attempts are spent. Its id is the `webhook-id` receivers deduplicate on."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    event: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Each attempt: {"at", "status_code" (null when no answer), "error", "seconds"}.
    log: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
