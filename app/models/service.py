"""The registry of trained models: models, their versions and aliases, and their exports.

Rows in the database; artifacts under data_dir/models/<id> (timm's own layout), exports under
data_dir/exports/<id>. A model is registered by one typed call (`register_model`) from the worker
that trained it; an export is requested here and built by a worker (app/models/runner.py);
everything else here answers the API.
"""

import os
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core import outbox
from app.core.config import Settings
from app.core.db import session_scope
from app.core.errors import Conflict
from app.core.objects import get_store, local_copy
from app.core.storage import remove_quietly, remove_unowned
from app.core.tenancy import Scoped
from app.db.tables import Export, Model, ModelAlias, ModelName, utcnow
from app.models.schemas import ExportFormat

models = Scoped(Model, "model")
aliases = Scoped(ModelAlias, "alias")
exports = Scoped(Export, "export")
REGISTER_ATTEMPTS = 5  # concurrent registrations of one name race for its next version number


@dataclass(frozen=True)
class NewModel:
    """What a finished job hands the registry."""

    tenant_id: str
    name: str
    job_id: str
    dataset_id: str
    backbone: str
    strategy: str
    classes: list[str]
    metrics: dict[str, Any]
    preprocessing: dict[str, Any]
    artifact: Path  # a complete artifact directory outside the registry (staging); moved in, not copied
    # Each validation image as the kept weights predicted it: {"path", "label", "predicted", "confidence"}.
    validation: list[dict[str, Any]] | None = None


def register_model(settings: Settings, new: NewModel, finish: Callable[[Session, Model], None]) -> Model:
    """Move the artifact into place and add the model as the next version of its name, in one
    transaction with `finish` (the caller's own writes, such as marking its job succeeded; raising
    there registers nothing). The unique (job, backbone, strategy) makes a second copy of a job's
    model impossible; the unique (tenant, name, version) makes concurrent registrations of one name
    retry."""
    model_id = f"model_{secrets.token_hex(12)}"
    final, store = artifact_dir(settings, model_id), get_store()
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(new.artifact, final)
    size = sum(f.stat().st_size for f in final.iterdir())
    try:
        store.put_tree(artifact_key(model_id))  # complete before the row points at it
        for attempt in range(REGISTER_ATTEMPTS):
            try:
                with session_scope() as session:
                    return _insert(session, new, model_id, size, finish)
            except IntegrityError:
                with session_scope() as session:
                    registered = session.scalar(select(Model.id).where(
                        Model.job_id == new.job_id, Model.backbone == new.backbone, Model.strategy == new.strategy))
                if attempt == REGISTER_ATTEMPTS - 1 or registered:
                    raise
        raise AssertionError("unreachable")
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        with suppress(Exception):
            store.delete(artifact_key(model_id))
        raise
    finally:
        if not store.is_local:
            shutil.rmtree(final, ignore_errors=True)  # the API fetches it from the store when it serves it


def _next_version(session: Session, tenant_id: str, name: str) -> int:
    """The name's next version number, never one given out before (deleted versions included).
    A concurrent registration of the same name makes the conditional update or the insert fail,
    and `register_model` tries again."""
    counter = session.get(ModelName, (tenant_id, name))
    if counter is None:
        session.add(ModelName(tenant_id=tenant_id, name=name, last_version=1))
        session.flush()  # IntegrityError if another registration inserted it first
        return 1
    version = counter.last_version + 1
    taken = session.execute(
        update(ModelName)
        .where(ModelName.tenant_id == tenant_id, ModelName.name == name, ModelName.last_version == counter.last_version)
        .values(last_version=version)
    ).rowcount
    if not taken:
        raise IntegrityError("model_names", None, Exception(f"{name}: version {version} taken concurrently"))
    return version


def _insert(session: Session, new: NewModel, model_id: str, size: int, finish: Callable[[Session, Model], None]) -> Model:
    model = Model(
        id=model_id,
        tenant_id=new.tenant_id,
        name=new.name,
        version=_next_version(session, new.tenant_id, new.name),
        job_id=new.job_id,
        dataset_id=new.dataset_id,
        backbone=new.backbone,
        strategy=new.strategy,
        classes=new.classes,
        metrics=new.metrics,
        preprocessing=new.preprocessing,
        size_bytes=size,
        validation=new.validation,
    )
    finish(session, model)
    session.add(model)
    session.flush()  # the unique constraints are checked here, inside the retry
    return model


def get_model(session: Session, tenant_id: str, ref: str) -> Model:
    """A model of this tenant by id, `name@version` or `name@alias`."""
    name, at, tag = ref.partition("@")
    if not at:
        return models.get(session, tenant_id, ref)
    if tag.isdigit():
        return models.first(session, tenant_id, ref, Model.name == name, Model.version == int(tag))
    pointer = aliases.select(tenant_id).where(ModelAlias.name == name, ModelAlias.alias == tag)
    return models.first(session, tenant_id, ref, Model.id == pointer.with_only_columns(ModelAlias.model_id).scalar_subquery())


def list_models(session: Session, tenant_id: str, limit: int, after: str | None = None) -> list[Model]:
    return models.list(session, tenant_id, limit, after=after)


def validation_predictions(session: Session, model: Model, wrong: bool, limit: int) -> list[dict[str, Any]]:
    """The model's validation images as its kept weights predicted them, in the split's order; with
    `wrong`, only the misclassified ones, most confident first (ties in the split's order). A model
    registered before they were kept (migration 0013) has none."""
    query = models.select(model.tenant_id).where(Model.id == model.id).with_only_columns(Model.validation)
    predictions = session.scalar(query) or []
    if wrong:
        predictions = sorted((p for p in predictions if p["predicted"] != p["label"]), key=lambda p: -p["confidence"])
    return predictions[:limit]


def model_ids_of_jobs(session: Session, job_ids: list[str]) -> dict[str, str]:
    """job id -> the id of its latest model, for those that made one (an `auto` job's second model,
    the search's winner, replaces the probe it served meanwhile)."""
    rows = session.execute(select(Model.job_id, Model.id).where(Model.job_id.in_(job_ids)).order_by(Model.created_at))
    return dict(rows.all())


def aliases_of(session: Session, model: Model) -> list[str]:
    query = aliases.select(model.tenant_id).where(ModelAlias.model_id == model.id).order_by(ModelAlias.alias)
    return [pointer.alias for pointer in session.scalars(query)]


def set_alias(session: Session, tenant_id: str, name: str, alias: str, version: int) -> ModelAlias:
    """Point `name@alias` at a version, in one transaction: every request sees the old or the new model."""
    model = get_model(session, tenant_id, f"{name}@{version}")
    pointer = session.scalar(aliases.select(tenant_id).where(ModelAlias.name == name, ModelAlias.alias == alias))
    if pointer is None:
        pointer = ModelAlias(tenant_id=tenant_id, name=name, alias=alias, model_id=model.id)
        session.add(pointer)
    else:
        pointer.model_id = model.id
        pointer.updated_at = utcnow()
    session.commit()
    return pointer


def delete_alias(session: Session, tenant_id: str, name: str, alias: str) -> None:
    ref = f"{name}@{alias}"
    pointer = aliases.first(session, tenant_id, ref, ModelAlias.name == name, ModelAlias.alias == alias)
    session.delete(pointer)
    session.commit()


def artifact_key(model_id: str) -> str:
    return f"models/{model_id}"


EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


def export_key(model_id: str, format: str = "onnx") -> str:
    """The fp32 ONNX export where it always was; another format in a tree of its own, still named
    by the model's id (what orphan collection checks), so that finishing one never touches another."""
    return f"exports/{model_id}" if format == "onnx" else f"exports-{format}/{model_id}"


def artifact_dir(settings: Settings, model_id: str) -> Path:
    return settings.data_dir / artifact_key(model_id)


def exports_dir(settings: Settings, model_id: str, format: str = "onnx") -> Path:
    return settings.data_dir / export_key(model_id, format)


def local_artifact(settings: Settings, model_id: str) -> Path:
    """The model's artifact on this machine (fetched from the object store on first use)."""
    return local_copy(artifact_key(model_id), settings.artifact_cache_bytes)


def model_exists(model_id: str) -> bool:
    """Whether the row of a model, already found for its tenant, is still there (serving asks)."""
    with session_scope() as session:
        return session.scalar(select(Model.id).where(Model.id == model_id)) is not None


def ready_exports(model_id: str) -> set[str]:
    """The formats of the model's exports that are ready."""
    with session_scope() as session:
        return set(session.scalars(select(Export.format).where(Export.model_id == model_id, Export.status == "ready")))


def local_exports(settings: Settings, model_id: str) -> dict[str, Path]:
    """The model's ready exports on this machine, by format (fetched from the object store on first use)."""
    return {format: local_export(settings, model_id, format) for format in sorted(ready_exports(model_id))}


def local_export(settings: Settings, model_id: str, format: str) -> Path:
    return local_copy(export_key(model_id, format), settings.artifact_cache_bytes) / "model.onnx"


def zip_artifact(settings: Settings, model: Model) -> Path:
    """The artifact directory as a zip in staging (the caller removes it once sent)."""
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f"{model.id}-", suffix=".zip", dir=settings.staging_dir)
    os.close(handle)
    # Stored, not deflated: safetensors weights barely compress.
    with zipfile.ZipFile(name, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(local_artifact(settings, model.id).iterdir()):
            archive.write(path, arcname=f"{model.id}/{path.name}")
    return Path(name)


def delete_model(session: Session, settings: Settings, model: Model) -> None:
    """Delete a version and its files. Refused (409) while an alias points at it: move or delete
    the alias first, so that `name@alias` never starts answering 404 by surprise."""
    if pointing := aliases_of(session, model):
        names = ", ".join(f"{model.name}@{alias}" for alias in pointing)
        raise Conflict(f"Model '{model.id}' ({model.name}@{model.version}) is what {names} points at: move or "
                       "delete the alias first.", code="model_has_aliases", details=[{"aliases": pointing}])  # fmt: skip
    session.delete(session.merge(model))
    session.commit()
    for key in (artifact_key(model.id), *(export_key(model.id, format) for format in EXPORT_FORMATS)):
        get_store().delete(key)
        remove_quietly(settings.data_dir / key)


def collect_orphans(session: Session, settings: Settings, older_than: float) -> list[str]:
    """Remove artifact and export directories that no model row owns (a process stopped between
    moving an artifact in and committing its row, or between deleting a row and its files)."""
    exports = [exports_dir(settings, "", format) for format in EXPORT_FORMATS]  # data_dir/exports, data_dir/exports-onnx-int8
    return remove_unowned(session, Model, [settings.models_dir, *exports], older_than)


def get_export(session: Session, model: Model, format: str) -> Export:
    return exports.first(session, model.tenant_id, f"{model.id}/{format}", Export.model_id == model.id,
                         Export.format == format)  # fmt: skip


def request_export(session: Session, model: Model, format: str) -> tuple[Export, bool]:
    """The model's export in `format`, queued for a worker if it has none yet (or its last attempt
    failed); the flag says if it was queued now. One export per model and format: of concurrent
    requests, one inserts the row (the database's unique constraint) and the others get it."""
    export = session.scalar(exports.select(model.tenant_id).where(Export.model_id == model.id, Export.format == format))
    if export is None:
        export = Export(id=f"export_{secrets.token_hex(12)}", tenant_id=model.tenant_id, model_id=model.id,
                        format=format, status="processing")  # fmt: skip
        session.add(export)
        try:
            session.commit()
        except IntegrityError:  # a concurrent request made it first
            session.rollback()
            return get_export(session, model, format), False
    elif export.status == "failed":
        retried = session.execute(
            update(Export)
            .where(Export.id == export.id, Export.status == "failed")
            .values(status="processing", error=None, parity=None, claimed_by=None, dispatched_at=None, finished_at=None)
        ).rowcount
        session.commit()
        session.refresh(export)
        if not retried:
            return export, False
    else:
        return export, False
    outbox.dispatch(session, outbox.EXPORT, [export.id])
    return export, True


def existing_export(settings: Settings, session: Session, model: Model, format: str) -> Path:
    export = get_export(session, model, format)
    if export.status != "ready":
        raise Conflict(f"The {format} export of model '{model.id}' is {export.status}, not ready: GET "
                       f"/v1/models/{model.id}/exports/{format} says why.", code="export_not_ready")
    return local_export(settings, model.id, format)
