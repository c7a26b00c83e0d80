"""Thin task bodies: load the job from the database and let app.jobs.runner do the work."""

import logging

from app.core.broker import FINETUNE_TASK
from app.jobs import runner
from workers.celery_app import celery_app
from workers.loader_context import PoolSafeForkContext

logger = logging.getLogger(__name__)


@celery_app.task(name=FINETUNE_TASK)
def run_finetune(job_id: str) -> str:
    outcome = runner.run_job(job_id, loader_context=PoolSafeForkContext())
    logger.info("job %s: %s", job_id, outcome.status)
    return outcome.status
