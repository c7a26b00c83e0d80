"""A dataset's audit: requested by the API (GET /v1/datasets/{id}/audit), computed once per
dataset and backbone by a background worker (the `audits` queue), kept in its row.

The findings come from app/ml/audit.py; here is only who computes it when. As with exports, the
row decides what a message does (app/core/outbox.py): a worker that dies leaves the audit to the
sweeper, which sends it again.
"""

import hashlib
import logging
import secrets

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.backbones.service import find_weights, split_backbone
from app.core import outbox
from app.core.config import get_settings
from app.core.db import session_scope
from app.core.errors import AppError, Conflict
from app.core.objects import StorageUnavailable
from app.db.tables import Audit, Dataset, utcnow
from app.datasets.service import local_dataset
from app.ml.audit import AuditImage, audit, image_features
from app.ml.backbone import build_model
from app.ml.data import list_samples

logger = logging.getLogger(__name__)
DEFAULT_BACKBONE = "mobilenetv2_100"  # the backbone the thresholds of app/ml/audit.py were measured with


def request_audit(session: Session, dataset: Dataset, backbone: str) -> tuple[Audit, bool]:
    """The dataset's audit through `backbone`, queued for a worker if there is none yet; the flag
    says if it was queued now. One per dataset and backbone (the database's unique constraint)."""
    if dataset.status != "ready":
        raise Conflict(f"Dataset '{dataset.id}' is {dataset.status}: only a ready dataset can be audited.",
                       code="dataset_not_ready")  # fmt: skip
    split_backbone(backbone, get_settings())  # 422 for an unknown name, before a row exists
    query = select(Audit).where(Audit.dataset_id == dataset.id, Audit.backbone == backbone)
    found = session.scalar(query)
    if found is not None:
        return found, False
    new = Audit(id=f"audit_{secrets.token_hex(12)}", tenant_id=dataset.tenant_id, dataset_id=dataset.id,
                backbone=backbone, status="processing")  # fmt: skip
    session.add(new)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request made it first
        session.rollback()
        return session.scalars(query).one(), False
    outbox.dispatch(session, outbox.AUDIT, [new.id])
    return new, True


def run_audit(audit_id: str) -> str:
    """Compute the audit if this process can hold it; what became of it."""
    settings, me = get_settings(), outbox.worker_identity()
    with session_scope() as session:
        if not outbox.claim(session, outbox.AUDIT, audit_id, me, settings.job_lease_seconds):
            return "not_held"
        row = session.get(Audit, audit_id)
        dataset = session.get(Dataset, row.dataset_id) if row else None
        backbone = row.backbone if row else ""
    if dataset is None:  # deleted with its dataset just now
        return "dropped"
    try:
        with outbox.heartbeat(outbox.AUDIT, audit_id, me, settings.staging_dir / f"audit-{audit_id}"):
            directory = local_dataset(settings, dataset)
            class_names = [c["name"] for c in dataset.classes]
            images = [
                AuditImage(path.relative_to(directory).as_posix(), label, split, _sha256(path))
                for split in ("train", "val")
                for path, label in list_samples(directory / split, class_names)
            ]
            architecture, tag = split_backbone(backbone, settings)
            weights = find_weights(settings, architecture, tag)
            if weights.file is None:
                raise AppError(weights.explain(), code="weights_not_found")
            model = build_model(weights.model_name(architecture), len(class_names), weights_file=weights.file)
            features = image_features(model, [directory / image.file for image in images])
            result = audit(features, images, class_names)
        return _finish(audit_id, me, status="ready", result=result)
    except StorageUnavailable as error:
        return outbox.wait_for_store(outbox.AUDIT, audit_id, me, error.message)
    except AppError as error:
        return _finish(audit_id, me, status="failed", error=error.as_dict())
    except Exception as exc:
        logger.exception("audit %s failed", audit_id)
        return _finish(audit_id, me, status="failed", error=AppError(f"{type(exc).__name__}: {exc}",
                                                                        code="audit_error").as_dict())  # fmt: skip


def _finish(audit_id: str, me: str, **values) -> str:
    with session_scope() as session:
        held = session.execute(
            update(Audit).where(*outbox.still_held(outbox.AUDIT, audit_id, me)).values(finished_at=utcnow(), **values)
        ).rowcount
        session.commit()
    return values["status"] if held else "dropped"


def _sha256(path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
