"""Datasets: an uploaded archive becomes a validated ImageFolder under data_dir/datasets/<id>.

Ingestion happens in a staging directory; the dataset directory and its row appear together only
once everything checked out, so a refused upload leaves neither behind.
"""

import os
import secrets
from pathlib import Path

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import Conflict
from app.core.storage import ReceivedFile, out_of_space_is_507, remove_quietly, remove_unowned
from app.core.tenancy import Scoped
from app.datasets.ingest import IngestLimits, ingest_archive
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
    dataset_id = f"ds_{secrets.token_hex(12)}"
    staging = settings.staging_dir / dataset_id
    final = dataset_dir(settings, dataset_id)
    try:
        with out_of_space_is_507(staging):
            result = ingest_archive(upload.path, staging, limits_from(settings))
        check_quota(session, settings, tenant_id, new_bytes=upload.size)
        dataset = Dataset(
            id=dataset_id,
            tenant_id=tenant_id,
            name=(name or Path(upload.filename).name.split(".")[0] or dataset_id)[:200],
            status="ready",
            num_images=result.num_images,
            classes=result.classes,
            has_val_split=result.has_val_split,
            sha256=upload.sha256,
            size_bytes=upload.size,
            warnings=result.warnings,
        )
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
        session.add(dataset)
        session.commit()
        return dataset
    except BaseException:
        session.rollback()
        remove_quietly(staging)
        remove_quietly(final)
        raise
    finally:
        remove_quietly(upload.path)


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    return datasets.get(session, tenant_id, dataset_id)


def list_datasets(session: Session, tenant_id: str, limit: int) -> list[Dataset]:
    return datasets.list(session, tenant_id, limit)


def dataset_dir(settings: Settings, dataset_id: str) -> Path:
    return settings.datasets_dir / dataset_id


def collect_orphans(session: Session, settings: Settings, older_than: float) -> list[str]:
    """Remove dataset directories that no row owns (a process stopped between moving the files and
    committing the row, or between deleting the row and the files); the names removed."""
    return remove_unowned(session, Dataset, [settings.datasets_dir], older_than)


def delete_dataset(session: Session, settings: Settings, dataset: Dataset) -> None:
    if active := active_job_on_dataset(session, dataset.id):
        raise Conflict(f"Dataset '{dataset.id}' is in use by active job '{active}'.", code="dataset_in_use")
    # Move the files aside first, so that a failed commit leaves the dataset whole.
    trash = settings.staging_dir / f"deleted-{dataset.id}"
    directory = dataset_dir(settings, dataset.id)
    trash.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists():
        os.replace(directory, trash)
    try:
        session.delete(dataset)
        session.commit()
    except BaseException:
        if trash.exists():
            os.replace(trash, directory)
        raise
    remove_quietly(trash)
