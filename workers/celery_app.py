"""The Celery worker: `visiontune worker` (or `celery -A workers.celery_app worker -Q training`)."""

from app.core.broker import get_celery

celery_app = get_celery()
celery_app.conf.include = ["workers.tasks"]
