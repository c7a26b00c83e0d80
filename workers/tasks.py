"""Thin task bodies: each loads its row from the database and lets the domain's runner do the work."""

import logging

from app.core import metrics
from app.core.broker import AUDIT_TASK, EXPORT_TASK, FINETUNE_TASK, INGEST_TASK, WEBHOOK_TASK
from app.core.logs import working_on
from app.datasets.audit import run_audit
from app.datasets.runner import run_ingest
from app.jobs import runner
from app.models.runner import run_export
from app.webhooks.runner import run_delivery
from workers.celery_app import celery_app
from workers.loader_context import PoolSafeForkContext

logger = logging.getLogger(__name__)


@celery_app.task(name=FINETUNE_TASK)
def run_finetune(job_id: str) -> str:
    with working_on(job_id):
        outcome = runner.run_job(job_id, loader_context=PoolSafeForkContext())
    metrics.JOBS_FINISHED.labels(outcome.status).inc()
    logger.info("job %s: %s", job_id, outcome.status)
    return outcome.status


def _background(run, row_id: str) -> str:
    with working_on(row_id):
        outcome = run(row_id)
    logger.info("%s: %s", row_id, outcome)
    return outcome


@celery_app.task(name=INGEST_TASK)
def ingest_dataset(dataset_id: str) -> str:
    return _background(run_ingest, dataset_id)


@celery_app.task(name=EXPORT_TASK)
def export_model(export_id: str) -> str:
    return _background(run_export, export_id)


@celery_app.task(name=AUDIT_TASK)
def audit_dataset(audit_id: str) -> str:
    return _background(run_audit, audit_id)


@celery_app.task(name=WEBHOOK_TASK)
def deliver_webhook(delivery_id: str) -> str:
    return _background(run_delivery, delivery_id)
