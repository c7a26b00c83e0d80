"""Thin task bodies: load the job from the database and let app.jobs.runner do the work."""

import logging

from app.core.broker import FINETUNE_TASK
from app.jobs import runner
from workers.celery_app import celery_app
from workers.loader_context import PoolSafeForkContext

logger = logging.getLogger(__name__)


@celery_app.task(name=FINETUNE_TASK, bind=True, max_retries=None)
def run_finetune(self, job_id: str) -> str:
    outcome = runner.run_job(job_id, loader_context=PoolSafeForkContext())
    if outcome.retry_after is not None:
        # Another worker holds the job and is alive (or may be): look again when its lease ends.
        raise self.retry(countdown=outcome.retry_after)
    logger.info("job %s: %s", job_id, outcome.status)
    return outcome.status
