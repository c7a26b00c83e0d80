"""The registry of trained models: models, their versions and aliases, and their exports.

Rows in the database; artifacts under data_dir/models/<id> (timm's own layout), exports under
data_dir/exports/<id>. A model is registered by one typed call (`register_model`) from the worker
that trained it; everything else here answers the API.
"""

import json
import os
import secrets
import shutil
import socket
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import session_scope
from app.core.errors import Conflict, Invalid, NotFound
from app.core.leases import drop_lease, take_lease
from app.core.storage import remove_quietly, remove_unowned
from app.core.tenancy import Scoped
from app.db.tables import Model, ModelAlias, ModelName, utcnow
from app.ml import onnx_export

models = Scoped(Model, "model")
aliases = Scoped(ModelAlias, "alias")
REGISTER_ATTEMPTS = 5  # concurrent registrations of one name race for its next version number
EXPORT_WAIT_SECONDS = 600  # the longest an export may take before a waiting request gives up


@dataclass(frozen=True)
class NewModel:
    """What a finished job hands the registry."""

    tenant_id: str
    name: str
    job_id: str
    dataset_id: str
    backbone: str
    classes: list[str]
    metrics: dict[str, Any]
    preprocessing: dict[str, Any]
    artifact: Path  # a complete artifact directory outside the registry (staging); moved in, not copied


def register_model(settings: Settings, new: NewModel, finish: Callable[[Session, Model], None]) -> Model:
    """Move the artifact into place and add the model as the next version of its name, in one
    transaction with `finish` (the caller's own writes, such as marking its job succeeded; raising
    there registers nothing). The unique job_id makes a second model of one job impossible; the
    unique (tenant, name, version) makes concurrent registrations of one name retry."""
    model_id = f"model_{secrets.token_hex(12)}"
    final = artifact_dir(settings, model_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(new.artifact, final)
    size = sum(f.stat().st_size for f in final.iterdir())
    try:
        for attempt in range(REGISTER_ATTEMPTS):
            try:
                with session_scope() as session:
                    return _insert(session, new, model_id, size, finish)
            except IntegrityError:
                with session_scope() as session:
                    has_model = session.scalar(select(Model.id).where(Model.job_id == new.job_id))
                if attempt == REGISTER_ATTEMPTS - 1 or has_model:
                    raise
        raise AssertionError("unreachable")
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise


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
        classes=new.classes,
        metrics=new.metrics,
        preprocessing=new.preprocessing,
        size_bytes=size,
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


def list_models(session: Session, tenant_id: str, limit: int) -> list[Model]:
    return models.list(session, tenant_id, limit)


def model_ids_of_jobs(session: Session, job_ids: list[str]) -> dict[str, str]:
    """job id -> the id of the model it produced, for those that produced one."""
    return dict(session.execute(select(Model.job_id, Model.id).where(Model.job_id.in_(job_ids))).all())


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


def artifact_dir(settings: Settings, model_id: str) -> Path:
    return settings.models_dir / model_id


def exports_dir(settings: Settings, model_id: str) -> Path:
    return settings.exports_dir / model_id


def onnx_file(settings: Settings, model_id: str) -> Path:
    return exports_dir(settings, model_id) / "model.onnx"


def zip_artifact(settings: Settings, model: Model) -> Path:
    """The artifact directory as a zip in staging (the caller removes it once sent)."""
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f"{model.id}-", suffix=".zip", dir=settings.staging_dir)
    os.close(handle)
    # Stored, not deflated: safetensors weights barely compress.
    with zipfile.ZipFile(name, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(artifact_dir(settings, model.id).iterdir()):
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
    remove_quietly(artifact_dir(settings, model.id))
    remove_quietly(exports_dir(settings, model.id))


def collect_orphans(session: Session, settings: Settings, older_than: float) -> list[str]:
    """Remove artifact and export directories that no model row owns (a process stopped between
    moving an artifact in and committing its row, or between deleting a row and its files)."""
    return remove_unowned(session, Model, [settings.models_dir, settings.exports_dir], older_than)


def existing_onnx(settings: Settings, model: Model) -> Path:
    path = onnx_file(settings, model.id)
    if not path.exists():
        raise NotFound(f"Model '{model.id}' has no ONNX export yet: POST /v1/models/{model.id}/exports.",
                       code="export_not_found")  # fmt: skip
    return path


def export_onnx(settings: Settings, model: Model, validation_images: Callable[[], list[Path]]) -> tuple[dict, bool]:
    """Export to ONNX and check parity on the model's own validation images (asked for only when
    needed: the job that trained the model knows them); refuse on mismatch. A model is immutable,
    so an export that exists is returned as is; the flag says if it is new. One export per model
    even under concurrent requests, from any API process: a lease in the database lets one make
    it while the others wait for it."""
    lease, holder = f"export:{model.id}", f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    deadline = time.monotonic() + EXPORT_WAIT_SECONDS
    while True:
        if (done := _existing_export(settings, model)) is not None:
            return done, False
        with session_scope() as session:
            if take_lease(session, lease, holder, EXPORT_WAIT_SECONDS):
                break
        if time.monotonic() > deadline:
            raise Conflict(f"Model '{model.id}' is being exported by another request; try again.", code="export_busy")
        time.sleep(0.5)
    try:
        if (done := _existing_export(settings, model)) is not None:  # made while this request waited
            return done, False
        directory = exports_dir(settings, model.id)
        images = validation_images()
        directory.mkdir(parents=True, exist_ok=True)
        report = onnx_export.export_onnx(artifact_dir(settings, model.id), directory / "model.onnx", images)
        if not report.passed:
            raise Invalid(
                f"ONNX export refused: top-1 agreement {report.top1_agreement:.4f} (needs 1.0), max probability "
                f"difference {report.max_abs_prob_diff:.2e} (needs <= 1e-4) on {report.images} validation images.",
                code="parity_failed",
                details=[report.as_dict()],
            )
        (directory / "parity.json").write_text(json.dumps(report.as_dict()))  # written last: marks the export done
        return _export_out(model, directory, report.as_dict()), True
    finally:
        with session_scope() as session:
            drop_lease(session, lease, holder)


def _existing_export(settings: Settings, model: Model) -> dict | None:
    directory = exports_dir(settings, model.id)
    if not (directory / "parity.json").exists():
        return None
    return _export_out(model, directory, json.loads((directory / "parity.json").read_text()))


def _export_out(model: Model, directory: Path, parity: dict) -> dict:
    return {"model_id": model.id, "format": "onnx", "size_bytes": (directory / "model.onnx").stat().st_size,
            "parity": parity}  # fmt: skip
