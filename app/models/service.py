"""The registry of trained models: rows in the database, artifacts under data_dir/models/<id>."""

import json
import os
import tempfile
import zipfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import Conflict, Invalid, NotFound
from app.core.storage import remove_quietly
from app.db.tables import Dataset, Job, Model, ModelAlias, utcnow
from app.ml import onnx_export
from app.ml.data import split_samples


def get_model(session: Session, tenant_id: str, ref: str) -> Model:
    """A model of this tenant by id, `name@version` or `name@alias`."""
    name, at, tag = ref.partition("@")
    mine = select(Model).where(Model.tenant_id == tenant_id)
    if not at:
        model = session.scalar(mine.where(Model.id == ref))
    elif tag.isdigit():
        model = session.scalar(mine.where(Model.name == name, Model.version == int(tag)))
    else:
        model = session.scalar(
            mine.join(ModelAlias, ModelAlias.model_id == Model.id).where(
                ModelAlias.tenant_id == tenant_id, ModelAlias.name == name, ModelAlias.alias == tag
            )
        )
    if model is None:
        raise NotFound(f"Model '{ref}' not found.", code="model_not_found")
    return model


def aliases_of(session: Session, model: Model) -> list[str]:
    return list(session.scalars(select(ModelAlias.alias).where(ModelAlias.model_id == model.id).order_by(ModelAlias.alias)))


def set_alias(session: Session, tenant_id: str, name: str, alias: str, version: int) -> ModelAlias:
    """Point `name@alias` at a version, in one transaction: every request sees the old or the new model."""
    model = get_model(session, tenant_id, f"{name}@{version}")
    pointer = session.get(ModelAlias, (tenant_id, name, alias))
    if pointer is None:
        pointer = ModelAlias(tenant_id=tenant_id, name=name, alias=alias, model_id=model.id)
        session.add(pointer)
    else:
        pointer.model_id = model.id
        pointer.updated_at = utcnow()
    session.commit()
    return pointer


def delete_alias(session: Session, tenant_id: str, name: str, alias: str) -> None:
    pointer = session.get(ModelAlias, (tenant_id, name, alias))
    if pointer is None:
        raise NotFound(f"Alias '{name}@{alias}' not found.", code="alias_not_found")
    session.delete(pointer)
    session.commit()


def list_models(session: Session, tenant_id: str, limit: int) -> list[Model]:
    query = select(Model).where(Model.tenant_id == tenant_id).order_by(Model.created_at.desc()).limit(limit)
    return list(session.scalars(query))


def artifact_dir(settings: Settings, model: Model) -> Path:
    return settings.models_dir / model.id


def zip_artifact(settings: Settings, model: Model) -> Path:
    """The artifact directory as a zip in staging (the caller removes it once sent)."""
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f"{model.id}-", suffix=".zip", dir=settings.staging_dir)
    os.close(handle)
    # Stored, not deflated: safetensors weights barely compress.
    with zipfile.ZipFile(name, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(artifact_dir(settings, model).iterdir()):
            archive.write(path, arcname=f"{model.id}/{path.name}")
    return Path(name)


def delete_model(session: Session, settings: Settings, model: Model) -> None:
    session.delete(session.merge(model))
    session.commit()
    remove_quietly(artifact_dir(settings, model))
    remove_quietly(exports_dir(settings, model))


def exports_dir(settings: Settings, model: Model) -> Path:
    return settings.data_dir / "exports" / model.id


def export_onnx(session: Session, settings: Settings, model: Model) -> tuple[dict, bool]:
    """Export to ONNX and check parity on the model's own validation images; refuse on mismatch.
    A model is immutable, so an export that exists is returned as is; the flag says if it is new."""
    directory = exports_dir(settings, model)
    if (directory / "parity.json").exists():
        return _export_out(model, directory, json.loads((directory / "parity.json").read_text())), False
    job = session.get(Job, model.job_id)
    dataset = session.get(Dataset, model.dataset_id)
    if dataset is None:
        raise Conflict("The model's dataset was deleted: its validation images are needed for the parity check.",
                       code="dataset_missing")  # fmt: skip
    _, val = split_samples(settings.datasets_dir / dataset.id, model.classes, dataset.has_val_split,
                           job.hyperparameters["val_fraction"], job.seed)  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    report = onnx_export.export_onnx(artifact_dir(settings, model), directory / "model.onnx", [p for p, _ in val])
    if not report.passed:
        raise Invalid(
            f"ONNX export refused: top-1 agreement {report.top1_agreement:.4f} (needs 1.0), max probability "
            f"difference {report.max_abs_prob_diff:.2e} (needs <= 1e-4) on {report.images} validation images.",
            code="parity_failed",
            details=[report.as_dict()],
        )
    (directory / "parity.json").write_text(json.dumps(report.as_dict()))  # written last: marks the export done
    return _export_out(model, directory, report.as_dict()), True


def _export_out(model: Model, directory: Path, parity: dict) -> dict:
    return {"model_id": model.id, "format": "onnx", "size_bytes": (directory / "model.onnx").stat().st_size,
            "parity": parity}  # fmt: skip
