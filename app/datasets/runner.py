"""Worker side of an upload: claim the dataset's ingest, unpack and decode its archive, and make it
`ready` or `failed`. Called by workers/tasks.py on the `ingest` queue.

What to do is decided from the row alone (app/core/outbox.py): a message for a dataset that is
already held by a live worker, ready, failed or deleted does nothing. A worker that dies mid-way
leaves only its staging directory; the sweeper sends the ingest again and the next worker starts
it over from the archive.
"""

import hashlib
import logging
import os
import secrets
from pathlib import Path

from sqlalchemy import select, update

from app.core import outbox
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.errors import AppError
from app.core.objects import StorageUnavailable, get_store
from app.core.storage import out_of_space_is_507, remove_quietly
from app.datasets.ingest import IngestResult, ingest_archive
from app.datasets.service import limits_from, upload_key, upload_path
from app.db.tables import Dataset, utcnow
from app.webhooks import service as webhooks
from app.tenants.service import check_quota

logger = logging.getLogger(__name__)


class NotHeld(Exception):
    """The dataset stopped being this worker's to ingest: deleted, or taken over."""


def run_ingest(dataset_id: str) -> str:
    """Ingest the dataset if this process can hold it; what became of it."""
    settings, me = get_settings(), outbox.worker_identity()
    with session_scope() as session:
        if not outbox.claim(session, outbox.INGEST, dataset_id, me, settings.job_lease_seconds):
            return "not_held"
    staging = settings.staging_dir / f"ingest-{dataset_id}-{secrets.token_hex(4)}"
    archive = upload_path(settings, dataset_id)
    try:
        with outbox.heartbeat(outbox.INGEST, dataset_id, me, staging):
            if not archive.exists():  # received by an API on another machine
                get_store().get(upload_key(dataset_id), archive)
            with out_of_space_is_507(staging):
                result = ingest_archive(
                    archive, staging, limits_from(settings),
                    before_extract=lambda size: _reserve(settings, dataset_id, me, size),
                )  # fmt: skip
            _ready(settings, dataset_id, me, result, staging)
        return "ready"
    except NotHeld:
        logger.info("dataset %s: no longer held by %s, its ingest dropped", dataset_id, me)
        return "dropped"
    except StorageUnavailable as error:
        return outbox.wait_for_store(outbox.INGEST, dataset_id, me, error.message)
    except AppError as error:
        return _failed(settings, dataset_id, me, error)
    except Exception as exc:
        logger.exception("dataset %s: ingest failed", dataset_id)
        return _failed(settings, dataset_id, me, AppError(f"{type(exc).__name__}: {exc}", code="ingest_error"))
    finally:
        remove_quietly(staging)


def _reserve(settings: Settings, dataset_id: str, me: str, uncompressed: int) -> None:
    """The storage quota, checked again on what extraction will write, before it writes: the
    dataset now counts at that size."""
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise NotHeld
        check_quota(session, settings, dataset.tenant_id, new_bytes=max(0, uncompressed - dataset.size_bytes))
        held = session.execute(
            update(Dataset).where(*outbox.still_held(outbox.INGEST, dataset_id, me)).values(size_bytes=uncompressed)
        ).rowcount
        if not held:
            raise NotHeld
        session.commit()


def _ready(settings: Settings, dataset_id: str, me: str, result: IngestResult, staging: Path) -> None:
    """The images go to the object store under a key named after their content, complete before
    the row points at them: the conditional update first (it holds the row), then the objects,
    then the commit. Identical content already stored is shared, not stored twice."""
    key = f"datasets/{_content_sha256(staging)}"
    final, store = settings.data_dir / key, get_store()
    with session_scope() as session:
        held = session.execute(
            update(Dataset)
            .where(*outbox.still_held(outbox.INGEST, dataset_id, me))
            .values(
                status="ready", content_key=key, num_images=result.num_images, classes=result.classes,
                has_val_split=result.has_val_split, warnings=result.warnings, size_bytes=_tree_bytes(staging),
                finished_at=utcnow(),
            )
        ).rowcount  # fmt: skip
        if not held:
            raise NotHeld
        webhooks.record(session, _tenant_of(session, dataset_id), "dataset.ready",
                        {"id": dataset_id, "status": "ready", "num_images": result.num_images})  # fmt: skip
        if not final.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staging, final)
            except OSError:  # the same images, ingested for another upload at this very moment
                if not final.is_dir():
                    raise
            store.put_packed(key)
        session.commit()
    store.delete(upload_key(dataset_id))
    remove_quietly(upload_path(settings, dataset_id))


def _tenant_of(session, dataset_id: str) -> str:
    return session.scalar(select(Dataset.tenant_id).where(Dataset.id == dataset_id))


def _content_sha256(directory: Path) -> str:
    """One digest of every file's path and bytes: equal only for the same images in the same places."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with path.open("rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()


def _failed(settings: Settings, dataset_id: str, me: str, error: AppError) -> str:
    with session_scope() as session:
        held = session.execute(
            update(Dataset)
            .where(*outbox.still_held(outbox.INGEST, dataset_id, me))
            .values(status="failed", error=error.as_dict(), size_bytes=0, finished_at=utcnow())
        ).rowcount
        if held:
            webhooks.record(session, _tenant_of(session, dataset_id), "dataset.failed",
                            {"id": dataset_id, "status": "failed", "error": error.as_dict()})  # fmt: skip
        session.commit()
    if not held:
        return "dropped"
    get_store().delete(upload_key(dataset_id))
    remove_quietly(upload_path(settings, dataset_id))
    logger.info("dataset %s failed: %s", dataset_id, error.message)
    return "failed"


def _tree_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
