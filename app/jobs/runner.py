"""Worker side of a job: claim it, train it, register its model. Called by workers/tasks.py.

A message may arrive more than once (the sweeper in app/sweeper.py sends lost ones again,
a broker redelivers). What to do is decided from the database alone:
- queued            -> claim it and train;
- running, holder alive (fresh heartbeat)   -> someone else is on it: drop the message (if that
  holder dies, the sweeper sends a new one);
- running, holder dead (stale heartbeat, or its process is gone on this host) -> take it over and
  resume from its last checkpoint;
- paused, finished or cancelled -> nothing to do.

A worker stops training when its job is no longer running under its name (cancelled, paused,
released by a warm shutdown, taken over); the checkpoint stays unless the job was cancelled.
"""

import logging
import re
import secrets
import shutil
import time
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from timm.models import split_model_name_tag

from app.backbones.service import WeightsLookup, find_weights, model_shape, split_backbone
from app.core import metrics, outbox
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.errors import AppError, NotFound
from app.core.objects import StorageUnavailable, get_store
from app.core.outbox import holder_gone, worker_identity
from app.db.tables import Job, Model, utcnow
from app.datasets.service import get_dataset, local_dataset
from app.jobs.service import add_event, data_split, fail
from app.ml.backbone import build_model, preprocessing_of
from app.ml.data import Sample
from app.ml.export import save_artifact
from app.ml import auto
from app.ml.spec import Hyperparameters, resolve, resolve_for_device, total_epochs
from app.ml.train import CHECKPOINT_NAME, FEATURES_NAME, TrainResult, fine_tune, pick_device
from app.models.service import NewModel, register_model
from app.webhooks import service as webhooks

logger = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 2.0
PROGRESS_SECONDS = 1.0  # a running job's progress is written at most this often (and at the end of each pass)


@dataclass
class Outcome:
    status: str


class JobStopped(Exception):
    """The job stopped running under this worker while it trained it: cancelled, paused, released
    by this worker's warm shutdown, or taken over by another worker."""


def run_job(job_id: str, loader_context=None) -> Outcome:
    """Claim and run a job. `loader_context`: the multiprocessing context DataLoader workers are
    started with (the Celery worker passes one that works inside its pool processes)."""
    settings = get_settings()
    me = worker_identity()
    outcome = _claim(job_id, me, settings)
    if outcome is not None:
        return outcome
    try:
        _train(job_id, me, settings, loader_context)
        return Outcome("succeeded")
    except JobStopped as stop:
        logger.info("job %s stopped: %s", job_id, stop)
        with session_scope() as session:
            add_event(session, job_id, "worker_stopped", f"{me} stopped training: {stop}")
            if session.get(Job, job_id).status == "cancelled":
                _drop_checkpoint(settings, job_id)
        return Outcome("stopped")
    except StorageUnavailable as error:  # not the job's fault: it waits for the store, it does not fail
        with session_scope() as session:
            if outbox.put_back(session, outbox.TRAINING, job_id, me):
                add_event(session, job_id, "status", f"queued again, waiting for the object store: {error.message}")
                session.commit()
        return Outcome("queued")
    except AppError as error:
        _fail(job_id, error.code, error.message, me)
        return Outcome("failed")
    except Exception as error:
        logger.exception("job %s failed", job_id)
        _fail(job_id, "training_error", f"{type(error).__name__}: {error}", me)
        return Outcome("failed")


def _fail(job_id: str, code: str, message: str, me: str) -> None:
    with session_scope() as session:
        fail(session, job_id, code, message, claimed_by=me)


def _claim(job_id: str, me: str, settings: Settings) -> Outcome | None:
    """None when this process now holds the job; otherwise what happened instead."""
    with session_scope() as session:
        now = utcnow()
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(status="running", claimed_by=me, heartbeat_at=now, started_at=now, attempts=Job.attempts + 1,
                    progress=None)
        ).rowcount
        if claimed:
            add_event(session, job_id, "status", f"running on {me}")
            return None
        job = session.get(Job, job_id)
        if job is None:
            logger.warning("message for unknown job %s dropped", job_id)
            return Outcome("missing")
        if job.status != "running":  # paused, finished or cancelled
            add_event(session, job_id, "message_ignored", f"duplicate delivery ignored: job {job.status}")
            return Outcome(job.status)
        holder = job.claimed_by or ""
        if not holder_gone(holder, job.heartbeat_at, settings.job_lease_seconds):
            return Outcome("held_elsewhere")
        taken = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.claimed_by == holder)
            .values(claimed_by=me, heartbeat_at=now, attempts=Job.attempts + 1)
        ).rowcount
        if not taken:
            return Outcome("held_elsewhere")
        add_event(session, job_id, "status", f"resumed on {me} from the last checkpoint (previous worker {holder} is gone)")
        return None


def checkpoint_key(job_id: str) -> str:
    return f"jobs/{job_id}/{CHECKPOINT_NAME}"


def _drop_checkpoint(settings: Settings, job_id: str) -> None:
    get_store().delete(f"jobs/{job_id}")
    shutil.rmtree(settings.jobs_dir / job_id, ignore_errors=True)


class _DatabaseReporter:
    """Heartbeats, cancellation checks, progress within the phase and per-epoch events, written to
    the job's rows; the checkpoint goes to the object store once every `checkpoint_upload_seconds`
    of training, so that any worker, on any machine, can resume. Not every epoch: a linear probe's
    epochs take a fraction of a second, and sending its 28 MB checkpoint 30 times took 5 s of a
    12 s job (to moto's server on 127.0.0.1)."""

    def __init__(self, job_id: str, me: str, work_dir: Path, upload_seconds: float, epochs_done: int):
        self.job_id, self.me, self.work_dir, self.upload_seconds = job_id, me, work_dir, upload_seconds
        self._last_check = 0.0
        self._epoch_started = time.monotonic()
        self._sent_at = time.monotonic()
        self.epochs = self.network_epochs = self.feature_passes = 0  # what the run will do: set by plan()
        self._epoch_seconds: float | None = None  # smoothed
        self._epochs_done = epochs_done
        self._passes_done = 0
        self._last: tuple[str, float] | None = None  # the previous step: its phase, and when
        self._step_seconds: dict[str, float] = {}  # per phase: seconds per step, smoothed
        self._steps: dict[str, int] = {}  # per phase: steps in its latest pass
        self._progress_at = 0.0

    def plan(self, strategy: str, hp: Hyperparameters) -> None:
        """What the run ahead does, for the estimate of the time left: its epochs, and its passes
        over the images to compute a probe's features (training and validation images, and the
        mirrored training images with flip_views)."""
        self.epochs = total_epochs(strategy, hp)
        self.network_epochs = 0 if strategy == "linear_probe" else hp.epochs
        self.feature_passes = (3 if hp.flip_views else 2) if strategy in ("linear_probe", "lp_ft") else 0

    def phase(self, name: str) -> None:
        """A phase without steps of its own (searching, preparing), reported as it starts."""
        self._beat({"progress": {"phase": name, "step": None, "steps": None, "images_per_second": None,
                                 "eta_seconds": None}})  # fmt: skip
        self._last_check = time.monotonic()

    def check(self) -> None:
        if time.monotonic() - self._last_check < HEARTBEAT_SECONDS:
            return
        self._beat({})
        self._last_check = time.monotonic()

    def step(self, phase: str, done: int, total: int, images: int) -> None:
        now = time.monotonic()
        if self._last is not None and self._last[0] == phase:  # (a probe's epochs are one step each)
            seconds = now - self._last[1]
            previous = self._step_seconds.get(phase)
            self._step_seconds[phase] = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        if phase == "features" and done == total:
            self._passes_done += 1
        self._last, self._steps[phase] = (phase, now), total
        if now - self._progress_at < PROGRESS_SECONDS and done != total:
            return
        per_step = self._step_seconds.get(phase)
        self._beat({"progress": {
            "phase": phase, "step": done, "steps": total,
            "images_per_second": round(images / per_step, 1) if per_step else None,
            "eta_seconds": self._eta(phase, done, total),
        }})  # fmt: skip
        self._progress_at = self._last_check = now

    def _eta(self, phase: str, done: int, total: int) -> float | None:
        """Seconds left, at the speeds measured so far: None until they tell."""
        per_step = self._step_seconds.get(phase)
        if per_step is None:
            return None
        left_in_pass = (total - done) * per_step
        if phase == "features":
            if self.network_epochs:  # lp_ft: how fast its network epochs run is not known yet
                return None
            passes_left = max(self.feature_passes - self._passes_done - (done < total), 0)
            return round(left_in_pass + passes_left * total * per_step, 1)  # the probe's epochs: a fraction of a second
        epochs_left = max(self.epochs - self._epochs_done, 1)  # this one included
        if self._epoch_seconds is not None:
            elapsed = time.monotonic() - self._epoch_started
            return round(max(epochs_left * self._epoch_seconds - elapsed, left_in_pass), 1)
        if phase == "training":  # the first epoch: its validation is not timed yet
            return round(left_in_pass + (epochs_left - 1) * total * per_step, 1)
        return None

    def epoch_end(self, record: dict[str, Any]) -> None:
        message = (
            f"epoch {record['epoch']}/{record['epochs']}: train_loss {record['train_loss']:.4f}, "
            f"val_accuracy {record['val_accuracy']:.4f} (95% interval {record['val_accuracy_ci95'][0]:.3f}-"
            f"{record['val_accuracy_ci95'][1]:.3f})"
        )
        if time.monotonic() - self._sent_at >= self.upload_seconds:
            # Sending a checkpoint to a remote store takes a while: the job keeps beating meanwhile.
            with outbox.heartbeat(outbox.TRAINING, self.job_id, self.me, self.work_dir):
                get_store().put(checkpoint_key(self.job_id), self.work_dir / CHECKPOINT_NAME)
            self._sent_at = time.monotonic()
        seconds = time.monotonic() - self._epoch_started
        metrics.EPOCH_SECONDS.observe(seconds)
        self._epoch_seconds = seconds if self._epoch_seconds is None else 0.5 * self._epoch_seconds + 0.5 * seconds
        metrics.TRAIN_IMAGES_PER_SECOND.set(record["images_per_second"])
        self._epoch_started = time.monotonic()
        self._epochs_done = record["epoch"]
        self._beat({"epoch": record["epoch"], "metrics": record}, event=("epoch", message, record))

    def _beat(self, values: dict[str, Any], event: tuple[str, str, dict] | None = None) -> None:
        with session_scope() as session:
            held = session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.status == "running", Job.claimed_by == self.me)
                .values(heartbeat_at=utcnow(), **values)
            ).rowcount
            if not held:
                raise JobStopped("no longer running under this worker (cancelled, paused, released or taken over)")
            if event:
                add_event(session, self.job_id, *event)


def _train(job_id: str, me: str, settings: Settings, loader_context) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        try:
            dataset = get_dataset(session, job.tenant_id, job.dataset_id or "")
            train_samples, val_samples = data_split(session, settings, job)
        except NotFound as exc:
            raise AppError("The job's dataset was deleted.", code="dataset_missing") from exc
        class_names = [c["name"] for c in dataset.classes]
        backbone, strategy, pretrained, seed, tenant_id = job.backbone, job.strategy, job.pretrained, job.seed, job.tenant_id
        hp, requested_name, search, epochs_done = dict(job.hyperparameters), job.model_name, job.search, job.epoch
        split = "the dataset's val/ split" if dataset.has_val_split else f"a stratified {hp['val_fraction']:.0%} hold-out"
        add_event(
            session, job_id, "data", f"{len(train_samples)} training and {len(val_samples)} validation images ({split})",
            {"train_images": len(train_samples), "val_images": len(val_samples),
             "val_split": "dataset" if dataset.has_val_split else "stratified"},
        )  # fmt: skip
    device = pick_device()
    work_dir = settings.jobs_dir / job_id
    reporter = _DatabaseReporter(job_id, me, work_dir, settings.checkpoint_upload_seconds, epochs_done)
    registration = _Registration(job_id, me, settings, tenant_id, requested_name, dataset.name, dataset.id, class_names,
                                 val_samples, local_dataset(settings, dataset))  # fmt: skip
    if strategy == "auto":
        reporter.phase("searching")
        backbone, strategy, hp, served = _choose(job_id, me, settings, backbone, pretrained, hp, search, seed,
                                                 train_samples, val_samples, class_names, work_dir, reporter, device,
                                                 loader_context, registration)  # fmt: skip
        if served is not None:  # the probe it served while it searched won: that model is the job's
            with session_scope() as session:
                _succeed(session, job_id, me, tenant_id, session.get(Model, served))
            _drop_checkpoint(settings, job_id)
            return

    weights = _weights(settings, backbone) if pretrained else None
    if weights is not None:
        with session_scope() as session:
            add_event(session, job_id, "weights", weights.explain(), {"source": weights.source, "file": str(weights.file)})
    hp = resolve_for_device(Hyperparameters(**hp), device.type)
    reporter.plan(strategy, hp)
    reporter.phase("preparing")  # building the model, decoding the images
    with session_scope() as session:  # the job records exactly what runs, device choices included
        session.execute(update(Job).where(Job.id == job_id).values(hyperparameters=hp.model_dump()))
        threads = torch.get_num_threads()
        add_event(session, job_id, "device", f"training on {device} with {threads} threads", {"device": str(device), "threads": threads})
    model = _build(backbone, weights, len(class_names), hp)
    if not (work_dir / CHECKPOINT_NAME).exists():  # resumed on another machine: its last checkpoint
        with suppress(FileNotFoundError):
            get_store().get(checkpoint_key(job_id), work_dir / CHECKPOINT_NAME)
    result = fine_tune(model, train_samples, val_samples, class_names, strategy, hp, seed, work_dir, reporter, device,
                       loader_context)  # fmt: skip
    with outbox.heartbeat(outbox.TRAINING, job_id, me, work_dir):  # saving and sending the model takes a while
        registration.register(result, backbone, strategy, final=True)
    _drop_checkpoint(settings, job_id)


def _weights(settings: Settings, backbone: str) -> WeightsLookup:
    lookup = find_weights(settings, *split_backbone(backbone, settings))
    if lookup.file is None:
        raise AppError(lookup.explain(), code="weights_not_found")
    return lookup


def _build(backbone: str, weights: WeightsLookup | None, num_classes: int, hp: Hyperparameters) -> torch.nn.Module:
    """The timm model of a backbone: with its weights' tag (and so their pretrained config), or random."""
    name = weights.model_name(split_model_name_tag(backbone)[0]) if weights else backbone
    return build_model(name, num_classes, weights_file=weights.file if weights else None,
                       drop_path_rate=hp.drop_path_rate, img_size=hp.img_size)  # fmt: skip


def _choose(
    job_id: str, me: str, settings: Settings, backbone: str, pretrained: bool, hp: dict, options: dict, seed: int,
    train_samples: list, val_samples: list, class_names: list[str], work_dir: Path, reporter: _DatabaseReporter,
    device, loader_context, registration: "_Registration",
) -> tuple[str, str, dict, str | None]:  # fmt: skip
    """Run `auto` (app/ml/auto.py) and write its choice into the job: from then on the job is an
    ordinary one of that backbone and strategy (a worker that resumes it does not measure again).
    Once the requested backbone's probe is measured, it is trained on the whole training split and
    served while the search goes on; the last value returned is its model's id when it won."""
    asked = Hyperparameters(**hp)
    served: str | None = None

    def serve_probe(features: dict[str, torch.Tensor]) -> None:
        """Train and register the probe now (it is what the job keeps unless a candidate beats it),
        from the features the search computed; a worker resuming the job finds it registered."""
        nonlocal served
        with session_scope() as session:
            served = session.scalar(select(Model.id).where(
                Model.job_id == job_id, Model.backbone == backbone, Model.strategy == "linear_probe"))  # fmt: skip
        if served is None:
            probe_dir = work_dir / "probe"
            probe_dir.mkdir(parents=True, exist_ok=True)
            save_file(features, probe_dir / FEATURES_NAME)
            probe_hp = resolve_for_device(resolve(asked, "linear_probe"), device.type)
            result = fine_tune(_build(backbone, _weights(settings, backbone), len(class_names), asked), train_samples,
                               val_samples, class_names, "linear_probe", probe_hp, seed, probe_dir,
                               auto.Quiet(reporter.check), device, loader_context)  # fmt: skip
            with outbox.heartbeat(outbox.TRAINING, job_id, me, work_dir):
                served = registration.register(result, backbone, "linear_probe", final=False).id
            shutil.rmtree(probe_dir, ignore_errors=True)

    if not pretrained:
        choice = auto.Choice(backbone, "full", "no pretrained weights: every layer has to learn", {"trials": []})
    else:
        candidates = [backbone] + (_other_local_backbones(settings, backbone) if options["other_backbones"] else [])
        backbones = []
        for name in candidates:
            weights = _weights(settings, name)
            build = partial(_build, name, weights, len(class_names), asked)
            backbones.append(auto.Backbone(name, build, model_shape(split_model_name_tag(name)[0])[0]))

        def note(trial: auto.Trial) -> None:
            with session_scope() as session:
                add_event(session, job_id, "auto", trial.describe(), trial.record())

        choice = auto.search(backbones, train_samples, class_names, asked, seed, options["budget_seconds"],
                             work_dir / "auto", reporter.check, note, device, loader_context, serve_probe)  # fmt: skip
    if served is not None and (choice.backbone, choice.strategy) == (backbone, "linear_probe"):
        choice.features = None  # trained and registered already
    else:
        served = None
    if choice.features is not None:  # the final probe reads the training split's features back
        work_dir.mkdir(parents=True, exist_ok=True)
        save_file(choice.features, work_dir / FEATURES_NAME)
    resolved = resolve(asked, choice.strategy).model_dump()
    with session_scope() as session:
        chosen = session.execute(
            update(Job).where(Job.id == job_id, Job.status == "running", Job.claimed_by == me).values(
                backbone=choice.backbone, strategy=choice.strategy, strategy_reason=choice.reason,
                hyperparameters=resolved, search={**options, **choice.record},
            )
        ).rowcount  # fmt: skip
        if not chosen:  # cancelled, paused or taken over while it measured: the holder decides now
            raise JobStopped("no longer running under this worker when auto had chosen")
        add_event(session, job_id, "status", f"auto chose {choice.strategy} on {choice.backbone}: {choice.reason}",
                  {"backbone": choice.backbone, "strategy": choice.strategy})  # fmt: skip
    return choice.backbone, choice.strategy, resolved, served


def _other_local_backbones(settings: Settings, requested: str, limit: int = 3) -> list[str]:
    """Other architectures with weights in the local weights directory, smallest first."""
    if not settings.weights_dir:
        return []
    requested_architecture = split_model_name_tag(requested)[0]
    names = {}
    for path in sorted(settings.weights_dir.glob("*.safetensors")):
        architecture = split_model_name_tag(path.stem)[0]
        if architecture != requested_architecture and timm.is_model(architecture) and architecture not in names:
            names[architecture] = path.stem
    return sorted(names.values(), key=lambda name: model_shape(split_model_name_tag(name)[0])[0])[:limit]


def validation_predictions(
    result: TrainResult, val_samples: list[Sample], dataset_dir: Path, class_names: list[str]
) -> list[dict[str, Any]]:
    """Each validation image as the kept weights predicted it, in the split's order: its path
    relative to the dataset's root (as the dataset's images endpoint names it), true and top-1
    class, and the calibrated probability of the latter, as the served model reports it."""
    confidence, predicted = torch.softmax(result.val_logits / result.temperature, dim=1).max(dim=1)
    return [
        {"path": path.relative_to(dataset_dir).as_posix(), "label": class_names[label],
         "predicted": class_names[top], "confidence": round(probability, 6)}
        for (path, label), top, probability in zip(val_samples, predicted.tolist(), confidence.tolist(), strict=True)
    ]  # fmt: skip


@dataclass
class _Registration:
    """What the registry needs of the job's models besides the trained weights."""

    job_id: str
    me: str
    settings: Settings
    tenant_id: str
    requested_name: str | None  # None: '<dataset>-<architecture>' of the backbone registered
    dataset_name: str
    dataset_id: str
    class_names: list[str]
    val_samples: list[Sample]
    dataset_dir: Path

    def register(self, result: TrainResult, backbone: str, strategy: str, final: bool) -> Model:
        """Hand a trained model to the registry, which adds it in the same transaction as the job's
        own writes, only if this worker still holds the job: marking it succeeded (`final`), or
        saying that it serves this model meanwhile."""
        metrics = {**result.metrics, "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
                   "history": result.history}  # fmt: skip
        staging = self.settings.staging_dir / f"artifact-{secrets.token_hex(8)}"
        save_artifact(result.model, staging, self.class_names, metrics, result.temperature)

        def finish(session: Session, model: Model) -> None:
            if final:
                _succeed(session, self.job_id, self.me, self.tenant_id, model)
                return
            _hold(session, self.job_id, self.me, "cancelled or taken over before the probe was registered")
            add_event(session, self.job_id, "model",
                      f"serving {model.name}@{model.version} ({model.id}), the linear probe of {backbone}, while auto "
                      f"searches on: validation accuracy {model.metrics['val_accuracy']:.4f}",
                      {"model_id": model.id, "name": model.name, "version": model.version})  # fmt: skip

        new = NewModel(
            tenant_id=self.tenant_id,
            name=self.requested_name or default_model_name(self.dataset_name, split_model_name_tag(backbone)[0]),
            job_id=self.job_id,
            dataset_id=self.dataset_id,
            backbone=backbone,
            strategy=strategy,
            classes=self.class_names,
            metrics={k: v for k, v in metrics.items() if k != "history"},
            preprocessing=preprocessing_of(result.model),
            artifact=staging,
            validation=validation_predictions(result, self.val_samples, self.dataset_dir, self.class_names),
        )
        try:
            return register_model(self.settings, new, finish)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once registered


def _hold(session: Session, job_id: str, me: str, otherwise: str, **values: Any) -> None:
    """Write `values` (and a heartbeat) to the job if this worker still runs it; else stop."""
    held = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.claimed_by == me)
        .values(heartbeat_at=utcnow(), **values)
    ).rowcount
    if not held:
        raise JobStopped(otherwise)


def _succeed(session: Session, job_id: str, me: str, tenant_id: str, model: Model) -> None:
    # A finished job's metrics are those of the weights it kept (its best epoch), not its last epoch's.
    _hold(session, job_id, me, "cancelled or taken over before the model was registered", status="succeeded",
          finished_at=utcnow(), metrics=_summary(model.metrics))  # fmt: skip
    add_event(session, job_id, "status", f"succeeded: model {model.id} ({model.name}@{model.version})",
              {"model_id": model.id, "name": model.name, "version": model.version})  # fmt: skip
    webhooks.record(session, tenant_id, "job.succeeded", {"id": job_id, "status": "succeeded", "model_id": model.id,
                                                           "model": f"{model.name}@{model.version}"})  # fmt: skip


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("val_accuracy", "val_accuracy_ci95", "val_images", "val_top5_accuracy", "val_top5_accuracy_ci95",
            "macro_f1", "val_loss", "best_epoch", "stopped_early", "calibration")  # fmt: skip
    return {key: metrics[key] for key in keys if key in metrics}


def default_model_name(dataset_name: str, architecture: str) -> str:
    """'<dataset>-<architecture>' reduced to the characters a model name allows."""
    name = re.sub(r"[^a-z0-9._-]+", "-", f"{dataset_name}-{architecture}".lower()).strip("-._")
    return name[:100] or architecture
