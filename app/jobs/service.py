"""Jobs: creation, queries and the state machine queued -> running -> succeeded | failed | cancelled.

Every transition is a conditional UPDATE on the current status, so concurrent actors (API cancel,
a worker, a redelivered message) cannot both win.
"""

import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.backbones.service import split_backbone
from app.core import outbox
from app.core.config import Settings
from app.core.db import session_scope
from app.core.errors import Conflict, NotFound
from app.core.tenancy import Scoped
from app.datasets.service import get_dataset, local_dataset
from app.db.tables import Job, JobEvent, Sweep, utcnow
from app.jobs.schemas import JobCreate, JobError, JobEventOut, JobOut, Progress
from app.jobs.usage import ACTIVE, WAITING
from app.ml.data import Sample, split_samples
from app.ml.spec import Hyperparameters, resolve, total_epochs
from app.models.service import model_ids_of_jobs
from app.tenants.service import check_quota
from app.webhooks import service as webhooks

jobs = Scoped(Job, "job")


def add_event(session: Session, job_id: str, type_: str, message: str, data: dict[str, Any] | None = None) -> None:
    session.add(JobEvent(job_id=job_id, type=type_, message=message, data=data or {}))


def create_job(session: Session, settings: Settings, tenant_id: str, request: JobCreate) -> Job:
    return create_jobs(session, settings, tenant_id, [request])[0]


def create_jobs(
    session: Session, settings: Settings, tenant_id: str, requests: list[JobCreate], sweep: Sweep | None = None
) -> list[Job]:
    """Queue jobs (and the sweep they belong to) all together or not at all: every request is
    checked, and the tenant's quotas with it, before anything is stored."""
    created = []
    for request in requests:
        split_backbone(request.backbone, settings)
        dataset = get_dataset(session, tenant_id, request.dataset_id)
        if dataset.status != "ready":
            raise Conflict(f"Dataset '{dataset.id}' is {dataset.status}, not ready.", code="dataset_not_ready")
        strategy = request.strategy
        # "auto" resolves the hyperparameters for the strategy it chooses, on the worker.
        hyperparameters = request.hyperparameters if strategy == "auto" else resolve(request.hyperparameters, strategy)
        job = Job(
            id=f"job_{secrets.token_hex(12)}",
            tenant_id=tenant_id,
            dataset_id=dataset.id,
            backbone=request.backbone.strip(),
            strategy=strategy,
            search=request.auto.model_dump() if strategy == "auto" else None,
            sweep_id=sweep.id if sweep else None,
            model_name=request.model_name,
            pretrained=request.pretrained,
            accelerator=request.accelerator,
            hyperparameters=hyperparameters.model_dump(),
            seed=request.seed,
            status="queued",
            epoch=0,
            metrics={},
            attempts=0,
        )
        created.append((job, f"queued: {strategy}"))
    check_quota(session, settings, tenant_id, new_jobs=len(created))
    if sweep is not None:
        session.add(sweep)
        session.flush()  # its row before the jobs that point at it
    for job, message in created:
        session.add(job)
        add_event(session, job.id, "status", message)
    session.commit()
    # Enqueue only after the commit: a worker that receives the message must find the job. If the
    # broker is down, the jobs stay queued and the sweeper sends them once it is back.
    outbox.dispatch(session, outbox.TRAINING, [job.id for job, _ in created])
    return [job for job, _ in created]


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    return jobs.get(session, tenant_id, job_id)


def list_jobs(session: Session, tenant_id: str, limit: int, *where: Any, after: str | None = None) -> list[JobOut]:
    found = jobs.list(session, tenant_id, limit, *where, after=after)
    model_ids = model_ids_of_jobs(session, [job.id for job in found])
    return [to_out(session, job, model_ids.get(job.id)) for job in found]


def jobs_of_sweep(session: Session, tenant_id: str, sweep_id: str) -> list[JobOut]:
    return list_jobs(session, tenant_id, 10_000, Job.sweep_id == sweep_id)


def data_split(session: Session, settings: Settings, job: Job) -> tuple[list[Sample], list[Sample]]:
    """The job's (train, val) images: its dataset's own val/ split, or the stratified hold-out its
    seed and val_fraction pick. Training, the validation of the kept weights and the ONNX parity
    check of its model all read this one split."""
    dataset = get_dataset(session, job.tenant_id, job.dataset_id or "")
    class_names = [c["name"] for c in dataset.classes]
    return split_samples(local_dataset(settings, dataset), class_names, dataset.has_val_split,
                         job.hyperparameters["val_fraction"], job.seed)  # fmt: skip


def model_split(session: Session, settings: Settings, tenant_id: str, job_id: str) -> tuple[list[Sample], list[Sample]]:
    """The (train, val) images of the job that made a model: an export checks its parity on the
    validation images, and int8 calibrates on the training images."""
    try:
        return data_split(session, settings, get_job(session, tenant_id, job_id))
    except NotFound as exc:
        raise Conflict("The model's dataset was deleted: its images are needed to build and check an export.",
                       code="dataset_missing") from exc  # fmt: skip


def list_events(session: Session, job_id: str, after: int, limit: int) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
    return list(session.scalars(query))


def stream_state(tenant_id: str, job_id: str, after: int, limit: int) -> tuple[str, Progress, list[JobEventOut]] | None:
    """A job's status and progress, then its events after `after`: read in that order, so that once
    the status is final the events read with it are all there will be. None once the job is gone
    (deleted with its dataset)."""
    with session_scope() as session:
        job = session.scalar(jobs.select(tenant_id).where(Job.id == job_id))
        if job is None:
            return None
        status, progress = job.status, _progress(session, job)
        events = [JobEventOut.model_validate(event, from_attributes=True) for event in list_events(session, job_id, after, limit)]
        return status, progress, events


def _transition(session: Session, job: Job, to: str, allowed_from: tuple[str, ...], code: str, message: str,
                webhook_event: str | None = None, **values: Any) -> Job:  # fmt: skip
    """Move the job to `to` if it is in one of `allowed_from` (one conditional UPDATE: of two
    concurrent actors, one wins and the other gets 409)."""
    result = session.execute(
        update(Job).where(Job.id == job.id, Job.status.in_(allowed_from)).values(status=to, **values)
    )
    if result.rowcount == 0:
        session.rollback()
        session.refresh(job)
        raise Conflict(f"Job '{job.id}' is {job.status}: it cannot be {to}.", code=code)
    add_event(session, job.id, "status", message)
    if webhook_event:
        webhooks.record(session, job.tenant_id, webhook_event, {"id": job.id, "status": to})
    session.commit()
    session.refresh(job)
    return job


def cancel_job(session: Session, job: Job) -> Job:
    return _transition(session, job, "cancelled", WAITING, "job_not_cancellable", "cancelled", "job.cancelled",
                       finished_at=utcnow())  # fmt: skip


def pause_job(session: Session, job: Job) -> Job:
    """Paused at once; a worker training it notices within seconds, stops and releases itself, and
    the job keeps its last epoch's checkpoint to resume from."""
    return _transition(session, job, "paused", ACTIVE, "job_not_pausable", "paused: it resumes from its last checkpoint")


def resume_job(session: Session, settings: Settings, job: Job) -> Job:
    check_quota(session, settings, job.tenant_id, new_jobs=1)
    job = _transition(session, job, "queued", ("paused",), "job_not_paused", "resumed: queued again",
                      claimed_by=None, dispatched_at=None)  # fmt: skip
    outbox.dispatch(session, outbox.TRAINING, [job.id])
    return job


def fail(session: Session, job_id: str, code: str, message: str, *, claimed_by: str | None = None) -> bool:
    """Mark an unfinished job failed (only if still held by `claimed_by`, when given)."""
    query = update(Job).where(Job.id == job_id, Job.status.in_(WAITING))
    if claimed_by is not None:
        query = query.where(Job.claimed_by == claimed_by)
    result = session.execute(query.values(status="failed", error_code=code, error_message=message, finished_at=utcnow()))
    if result.rowcount:
        add_event(session, job_id, "status", f"failed: {message}", {"code": code})
        tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
        webhooks.record(session, tenant_id, "job.failed",
                        {"id": job_id, "status": "failed", "error": {"code": code, "message": message}})  # fmt: skip
    session.commit()
    return bool(result.rowcount)


def _epochs(job: Job) -> int:
    if job.strategy == "auto":
        return 0  # not known until a worker has chosen the strategy
    return total_epochs(job.strategy, Hyperparameters(**job.hyperparameters))


def _progress(session: Session, job: Job) -> Progress:
    if job.status == "running":  # where its worker last said it was
        return Progress(epoch=job.epoch, epochs=_epochs(job), **(job.progress or {"phase": "preparing"}))
    progress = Progress(epoch=job.epoch, epochs=_epochs(job), phase=job.status)
    if job.status == "queued":
        ahead = select(func.count()).where(Job.status == "queued", Job.created_at < job.created_at)
        progress.queue_position = session.scalar(ahead) + 1
    return progress


def to_out(session: Session, job: Job, model_id: str | None = None) -> JobOut:
    if model_id is None and job.status != "queued":  # a running `auto` job may serve its probe already
        model_id = model_ids_of_jobs(session, [job.id]).get(job.id)
    return JobOut(
        id=job.id,
        dataset_id=job.dataset_id,
        backbone=job.backbone,
        strategy=job.strategy,
        strategy_reason=job.strategy_reason,
        search=job.search,
        pretrained=job.pretrained,
        accelerator=job.accelerator,
        model_name=job.model_name,
        hyperparameters=job.hyperparameters,
        seed=job.seed,
        status=job.status,
        progress=_progress(session, job),
        metrics=job.metrics,
        model_id=model_id,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        worker=job.claimed_by,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )
