"""The registry of trained models: rows in the database, artifacts under data_dir/models/<id>."""

import os
import tempfile
import zipfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import NotFound
from app.core.storage import remove_quietly
from app.db.tables import Model


def get_model(session: Session, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise NotFound(f"Model '{model_id}' not found.", code="model_not_found")
    return model


def list_models(session: Session, limit: int) -> list[Model]:
    return list(session.scalars(select(Model).order_by(Model.created_at.desc()).limit(limit)))


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
    directory = artifact_dir(settings, model)
    session.delete(model)
    session.commit()
    remove_quietly(directory)
