"""Backbone sweeps: rank several backbones on the user's data by a cached-feature linear probe.

Each row is an ordinary `linear_probe` job (each backbone with its own preprocessing), so rows
are queued, retried, resumed, cancelled and turned into models exactly as jobs are.
"""

import secrets

from sqlalchemy.orm import Session
from timm.models import split_model_name_tag

from app.backbones.service import model_shape
from app.core.config import Settings
from app.core.errors import Invalid, NotFound
from app.core.tenancy import Scoped
from app.db.tables import Job, Sweep
from app.jobs import service as jobs
from app.jobs.schemas import JobCreate
from app.jobs.usage import TERMINAL
from app.sweeps.schemas import Promote, SweepCreate, SweepOut, SweepRow

sweeps = Scoped(Sweep, "sweep")


def create_sweep(session: Session, settings: Settings, tenant_id: str, request: SweepCreate) -> Sweep:
    sweep = Sweep(
        id=f"sweep_{secrets.token_hex(12)}", tenant_id=tenant_id, dataset_id=request.dataset_id, backbones=request.backbones
    )
    rows = [
        JobCreate(dataset_id=request.dataset_id, backbone=backbone, strategy="linear_probe", seed=request.seed)
        for backbone in request.backbones
    ]
    jobs.create_jobs(session, settings, tenant_id, rows, sweep=sweep)  # the whole sweep or nothing
    return sweep


def get_sweep(session: Session, tenant_id: str, sweep_id: str) -> Sweep:
    return sweeps.get(session, tenant_id, sweep_id)


def list_sweeps(session: Session, tenant_id: str, limit: int, after: str | None = None) -> list[Sweep]:
    return sweeps.list(session, tenant_id, limit, after=after)


def to_out(session: Session, sweep: Sweep) -> SweepOut:
    rows = []
    for job in sorted(jobs.jobs_of_sweep(session, sweep.tenant_id, sweep.id), key=lambda job: job.created_at):
        seconds = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
        done = job.metrics if job.status == "succeeded" else {}
        rows.append(
            SweepRow(
                rank=None,
                backbone=job.backbone,
                job_id=job.id,
                status=job.status,
                val_accuracy=done.get("val_accuracy"),
                val_accuracy_ci95=done.get("val_accuracy_ci95"),
                val_images=done.get("val_images"),
                macro_f1=done.get("macro_f1"),
                seconds=seconds,
                num_params=model_shape(split_model_name_tag(job.backbone)[0])[0],
                model_id=job.model_id,
                error=job.error.message if job.error else None,
            )
        )
    ranked = sorted((r for r in rows if r.val_accuracy is not None), key=lambda r: (-r.val_accuracy, -r.macro_f1))
    for rank, row in enumerate(ranked, start=1):
        row.rank = rank
    rows = ranked + [r for r in rows if r.val_accuracy is None]
    statuses = {row.status for row in rows}
    status = "finished" if statuses <= set(TERMINAL) else ("queued" if statuses == {"queued"} else "running")
    return SweepOut(id=sweep.id, dataset_id=sweep.dataset_id, status=status, rows=rows, created_at=sweep.created_at)


def promote(session: Session, settings: Settings, sweep: Sweep, request: Promote) -> Job:
    if request.backbone not in sweep.backbones:
        raise Invalid(
            f"'{request.backbone}' is not in this sweep ({', '.join(sweep.backbones)}).", code="backbone_not_in_sweep"
        )
    if sweep.dataset_id is None:
        raise NotFound("The sweep's dataset was deleted.", code="dataset_not_found")
    job = JobCreate(
        dataset_id=sweep.dataset_id,
        backbone=request.backbone,
        strategy=request.strategy,
        hyperparameters=request.hyperparameters,
        seed=request.seed,
    )
    return jobs.create_job(session, settings, sweep.tenant_id, job)
