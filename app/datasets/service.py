"""Datasets: an uploaded archive becomes a validated ImageFolder under data_dir/datasets/<id>.

The API stores the archive (data_dir/uploads/<id>) and its `processing` row together, and sends
the ingest to a worker (app/datasets/runner.py), which unpacks and decodes it in staging and
makes the dataset `ready` or `failed`. A refused upload leaves neither files nor a row behind.
"""

import os
import secrets
from contextlib import suppress
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import outbox
from app.core.config import Settings
from app.core.db import session_scope
from app.core.objects import get_store, local_copy
from app.core.errors import Conflict, NotFound
from app.core.storage import ReceivedFile, remove_quietly, remove_unowned, stale_entries
from app.core.tenancy import Scoped
from app.datasets.ingest import IngestLimits, check_format
from app.datasets.schemas import DatasetOut
from app.db.tables import Dataset
from app.jobs.usage import active_job_on_dataset
from app.tenants.service import check_quota

datasets = Scoped(Dataset, "dataset")


def limits_from(settings: Settings) -> IngestLimits:
    return IngestLimits(
        max_uncompressed_bytes=settings.max_uncompressed_bytes,
        max_archive_entries=settings.max_archive_entries,
        max_compression_ratio=settings.max_compression_ratio,
        max_image_pixels=settings.max_image_pixels,
        min_images_per_class=settings.min_images_per_class,
    )


MULTIPART_FRAMING = 4096  # bytes of a multipart body around the file itself, at most, for the early check


def check_room(session: Session, settings: Settings, tenant_id: str, declared_body_bytes: int) -> None:
    """Refuse (429) an upload whose declared size alone would take the tenant past its storage
    quota, before its body is received; the exact check follows on the bytes that arrive."""
    check_quota(session, settings, tenant_id, new_bytes=max(1, declared_body_bytes - MULTIPART_FRAMING))
    session.rollback()  # the check's lock on the tenant row must not be held while the body arrives


def create_dataset(
    session: Session, settings: Settings, tenant_id: str, upload: ReceivedFile, name: str | None
) -> Dataset:
    """Keep the received archive and queue its ingest: the dataset is `processing` until a worker
    has checked and unpacked it. What is not an archive at all is refused here (415)."""
    dataset_id = f"ds_{secrets.token_hex(12)}"
    archive, store = upload_path(settings, dataset_id), get_store()
    try:
        check_format(upload.path)
        check_quota(session, settings, tenant_id, new_bytes=upload.size)
        dataset = Dataset(
            id=dataset_id,
            tenant_id=tenant_id,
            name=(name or Path(upload.filename).name.split(".")[0] or dataset_id)[:200],
            status="processing",
            sha256=upload.sha256,
            archive_bytes=upload.size,
            size_bytes=upload.size,
        )
        archive.parent.mkdir(parents=True, exist_ok=True)
        os.replace(upload.path, archive)
        store.put(upload_key(dataset_id), archive)  # complete before the row points at it
        session.add(dataset)
        session.commit()
    except BaseException:
        session.rollback()
        remove_quietly(archive)
        with suppress(Exception):
            store.delete(upload_key(dataset_id))
        raise
    finally:
        remove_quietly(upload.path)
    if not store.is_local:
        remove_quietly(archive)  # the ingest worker fetches it from the store
    # Sent after the commit: the worker must find the row. If the broker is down, the sweeper
    # sends it once the broker is back.
    outbox.dispatch(session, outbox.INGEST, [dataset_id])
    return dataset


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    return datasets.get(session, tenant_id, dataset_id)


def current(tenant_id: str, dataset_id: str) -> DatasetOut | None:
    """The dataset as it is now, read in a session of its own (for a stream); None once deleted."""
    with session_scope() as session:
        try:
            return DatasetOut.model_validate(get_dataset(session, tenant_id, dataset_id), from_attributes=True)
        except NotFound:
            return None


def list_datasets(session: Session, tenant_id: str, limit: int, after: str | None = None) -> list[Dataset]:
    return datasets.list(session, tenant_id, limit, after=after)


def local_dataset(settings: Settings, dataset: Dataset) -> Path:
    """The dataset's images on this machine (a local copy of the object store's, fetched on
    first use with a remote store)."""
    return local_copy(dataset.content_key, settings.dataset_cache_bytes, packed=True)


def upload_key(dataset_id: str) -> str:
    return f"uploads/{dataset_id}"


def upload_path(settings: Settings, dataset_id: str) -> Path:
    return settings.data_dir / upload_key(dataset_id)


def collect_orphans(session: Session, settings: Settings, older_than: float) -> list[str]:
    """Remove dataset directories and archives that no row owns (a process stopped between moving
    the files and committing the row, or between deleting the row and the files), and archives
    whose ingest is over; the names removed."""
    removed = remove_unowned(session, Dataset, [settings.uploads_dir], older_than)
    stale = stale_entries(settings.datasets_dir, older_than)
    owned = set(session.scalars(select(Dataset.content_key).where(
        Dataset.content_key.in_([f"datasets/{p.name}" for p in stale]))))  # fmt: skip
    for path in stale:
        if f"datasets/{path.name}" not in owned:
            remove_quietly(path)
            removed.append(path.name)
    stale = stale_entries(settings.uploads_dir, older_than)
    over = session.scalars(
        select(Dataset.id).where(Dataset.id.in_([p.name for p in stale]), Dataset.status != "processing")
    ).all()
    for dataset_id in over:
        remove_quietly(upload_path(settings, dataset_id))
    return [*removed, *over]


def delete_dataset(session: Session, settings: Settings, dataset: Dataset) -> None:
    if active := active_job_on_dataset(session, dataset.id):
        raise Conflict(f"Dataset '{dataset.id}' is in use by active job '{active}'.", code="dataset_in_use")
    key = dataset.content_key
    session.delete(dataset)
    session.commit()
    # The row is gone first: its objects then belong to nobody, and a failure below leaves only
    # files that the sweeper collects. Identical uploads share their images: the last one takes them.
    if key and not session.scalar(select(Dataset.id).where(Dataset.content_key == key).limit(1)):
        get_store().delete(key)
        remove_quietly(settings.data_dir / key)
    get_store().delete(upload_key(dataset.id))  # an ingest that was still waiting
    remove_quietly(upload_path(settings, dataset.id))
