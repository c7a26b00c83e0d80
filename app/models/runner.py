"""Worker side of an export: claim it, build the ONNX file in staging (fp32, or int8 calibrated on
the model's training images), check its parity with PyTorch on the model's validation images, and
make the export `ready` (moved into place) or `failed` (with the parity report). Called by
workers/tasks.py on the `exports` queue.

As with ingests (app/datasets/runner.py), the row decides: a message for an export that is held
by a live worker, finished or deleted with its model does nothing, and a worker that dies leaves
only staging behind for the next one to start over.
"""

import json
import logging
import os
import secrets

from sqlalchemy import select, update

from app.core import outbox
from app.core.config import get_settings
from app.core.db import session_scope
from app.core.errors import AppError, Invalid
from app.core.objects import StorageUnavailable, get_store
from app.core.storage import remove_quietly
from app.db.tables import Export, Model, utcnow
from app.jobs.service import model_split
from app.ml import onnx_export
from app.models.service import export_key, exports_dir, local_artifact, local_export, ready_exports
from app.webhooks import service as webhooks

logger = logging.getLogger(__name__)


def run_export(export_id: str) -> str:
    """Build the export if this process can hold it; what became of it."""
    settings, me = get_settings(), outbox.worker_identity()
    with session_scope() as session:
        if not outbox.claim(session, outbox.EXPORT, export_id, me, settings.job_lease_seconds):
            return "not_held"
        export = session.get(Export, export_id)
        model = session.get(Model, export.model_id) if export else None
    if model is None:  # deleted with its model just now
        return "dropped"
    staging = settings.staging_dir / f"export-{export_id}-{secrets.token_hex(4)}"
    try:
        with outbox.heartbeat(outbox.EXPORT, export_id, me, staging):
            with session_scope() as session:
                train, val = model_split(session, settings, model.tenant_id, model.job_id)
            staging.mkdir(parents=True)
            artifact, out = local_artifact(settings, model.id), staging / "model.onnx"
            if export.format == "onnx-int8":
                fp32 = local_export(settings, model.id, "onnx") if "onnx" in ready_exports(model.id) else None
                report = onnx_export.export_onnx_int8(artifact, out, [path for path, _ in train], val, fp32_onnx=fp32)
                refused = (f"int8 export refused: top-1 agreement with PyTorch {report.top1_agreement:.4f} (needs >= "
                           f"{onnx_export.MIN_INT8_AGREEMENT}), accuracy {report.accuracy_int8:.4f} against "
                           f"{report.accuracy_fp32:.4f} (may drop {onnx_export.MAX_INT8_ACCURACY_DROP} at most) on "
                           f"{report.images} validation images.")  # fmt: skip
            else:
                report = onnx_export.export_onnx(artifact, out, [path for path, _ in val])
                refused = (f"ONNX export refused: top-1 agreement {report.top1_agreement:.4f} (needs 1.0), max probability "
                           f"difference {report.max_abs_prob_diff:.2e} (needs <= 1e-4) on {report.images} validation "
                           "images.")  # fmt: skip
            if not report.passed:
                raise Invalid(refused, code="parity_failed", details=[report.as_dict()])
            (staging / "parity.json").write_text(json.dumps(report.as_dict()))
            return _finish(export_id, me, staging, model.id, status="ready", parity=report.as_dict(),
                           size_bytes=out.stat().st_size)  # fmt: skip
    except StorageUnavailable as error:
        return outbox.wait_for_store(outbox.EXPORT, export_id, me, error.message)
    except AppError as error:
        return _finish(export_id, me, None, model.id, status="failed", error=error.as_dict(),
                       parity=(error.details or [None])[0] if error.code == "parity_failed" else None)  # fmt: skip
    except Exception as exc:
        logger.exception("export %s failed", export_id)
        error = AppError(f"{type(exc).__name__}: {exc}", code="export_error")
        return _finish(export_id, me, None, model.id, status="failed", error=error.as_dict())
    finally:
        remove_quietly(staging)


def _finish(export_id: str, me: str, staging, model_id: str, **values) -> str:
    """Record the outcome if this worker still holds the export; a ready one's files move into
    place inside that transaction (a failed commit takes them back out)."""
    with session_scope() as session:
        format = session.scalar(select(Export.format).where(Export.id == export_id))
        final = exports_dir(get_settings(), model_id, format)
        held = session.execute(
            update(Export).where(*outbox.still_held(outbox.EXPORT, export_id, me)).values(finished_at=utcnow(), **values)
        ).rowcount
        if not held:
            logger.info("export %s: no longer held by %s, dropped", export_id, me)
            return "dropped"
        if values["status"] == "ready":
            export = session.get(Export, export_id)
            webhooks.record(session, export.tenant_id, "model.exported",
                            {"id": export_id, "model_id": model_id, "format": export.format})  # fmt: skip
        if staging is not None:
            remove_quietly(final)  # an export made before exports had rows (migration 0006)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, final)
            get_store().put_tree(export_key(model_id, format))  # complete before the row says ready
        try:
            session.commit()
        except BaseException:
            if staging is not None:
                remove_quietly(final)
            raise
    return values["status"]
