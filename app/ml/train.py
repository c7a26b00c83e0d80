"""Transfer learning of a timm model: `linear_probe` on cached features, or `full` fine-tuning.

Pure ML: no HTTP and no database. The caller passes a Reporter that receives per-epoch records and
may stop training (cancellation) by raising from `check()`.

Each epoch reseeds torch from (seed, epoch), so a run resumed from the checkpoint written after
epoch k continues exactly as the uninterrupted run would, without storing RNG state.
"""

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_model_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from app.ml.data import ImageDataset, Sample
from app.ml.metrics import classification_metrics

CHECKPOINT_NAME = "checkpoint.pt"
FEATURES_NAME = "features.safetensors"


@dataclass(frozen=True)
class TrainSpec:
    strategy: str  # "linear_probe" | "full"
    epochs: int
    batch_size: int
    lr: float
    opt: str
    weight_decay: float
    sched: str
    warmup_epochs: int
    smoothing: float
    seed: int


class Reporter(Protocol):
    def check(self) -> None:
        """Called often; raise to stop training (for example, the job was cancelled)."""

    def epoch_end(self, record: dict[str, Any]) -> None:
        """Called after each epoch with its loss, validation metrics, speed and ETA."""


@dataclass
class TrainResult:
    model: torch.nn.Module  # holding the weights of the best epoch
    metrics: dict[str, Any]  # validation metrics of that epoch
    best_epoch: int
    history: list[dict[str, Any]]


def pick_device() -> torch.device:
    if torch.cuda.is_available():  # CUDA_VISIBLE_DEVICES decides which GPU this process sees
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device("cpu")


def fine_tune(
    model: torch.nn.Module,
    train_samples: list[Sample],
    val_samples: list[Sample],
    class_names: list[str],
    spec: TrainSpec,
    work_dir: Path,
    reporter: Reporter,
    device: torch.device | None = None,
) -> TrainResult:
    device = device or pick_device()
    work_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    if spec.strategy == "linear_probe":
        runner = _LinearProbe(model, train_samples, val_samples, spec, work_dir, reporter, device)
    elif spec.strategy == "full":
        runner = _FullFineTune(model, train_samples, val_samples, spec, reporter, device)
    else:
        raise ValueError(f"unknown strategy {spec.strategy!r}")

    optimizer = create_optimizer_v2(runner.trainable, opt=spec.opt, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=spec.sched, num_epochs=spec.epochs, warmup_epochs=spec.warmup_epochs
    )
    criterion = LabelSmoothingCrossEntropy(spec.smoothing) if spec.smoothing > 0 else torch.nn.CrossEntropyLoss()

    state = _load_checkpoint(work_dir)
    start_epoch, history, best = 0, [], None
    if state is not None:
        runner.trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best = state["epoch"], state["history"], state["best"]

    epoch_seconds: list[float] = []
    for epoch in range(start_epoch, spec.epochs):
        started = time.perf_counter()
        torch.manual_seed(spec.seed * 1000 + epoch)
        train_loss, seen, train_seconds = runner.train_epoch(optimizer, criterion)
        scheduler.step(epoch + 1)
        logits, targets = runner.evaluate()
        metrics = classification_metrics(logits, targets, class_names)
        epoch_seconds.append(time.perf_counter() - started)
        record = {
            "epoch": epoch + 1,
            "epochs": spec.epochs,
            "train_loss": train_loss,
            "val_loss": metrics["val_loss"],
            "val_accuracy": metrics["val_accuracy"],
            "macro_f1": metrics["macro_f1"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_second": seen / max(train_seconds, 1e-9),
            "eta_seconds": (spec.epochs - epoch - 1) * sum(epoch_seconds) / len(epoch_seconds),
        }
        history.append(record)
        if best is None or metrics["val_accuracy"] > best["metrics"]["val_accuracy"]:
            best = {
                "epoch": epoch + 1,
                "metrics": metrics,
                "weights": copy.deepcopy(runner.trainable.state_dict()),
            }
        _save_checkpoint(
            work_dir,
            {
                "epoch": epoch + 1,
                "trainable": runner.trainable.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "best": best,
            },
        )
        reporter.epoch_end(record)

    runner.trainable.load_state_dict(best["weights"])
    model.to("cpu").eval()
    return TrainResult(model=model, metrics=best["metrics"], best_epoch=best["epoch"], history=history)


def _save_checkpoint(work_dir: Path, state: dict[str, Any]) -> None:
    partial = work_dir / (CHECKPOINT_NAME + ".partial")
    torch.save(state, partial)
    os.replace(partial, work_dir / CHECKPOINT_NAME)  # a crash mid-write leaves the previous checkpoint


def _load_checkpoint(work_dir: Path) -> dict[str, Any] | None:
    path = work_dir / CHECKPOINT_NAME
    if not path.exists():
        return None
    # weights_only: plain tensors and containers; the service wrote this file itself.
    return torch.load(path, map_location="cpu", weights_only=True)


def _loader(samples: list[Sample], transform, batch_size: int, shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=batch_size, shuffle=shuffle)


class _LinearProbe:
    """Frozen backbone: features are computed once (and cached on disk for resumption); only the
    classifier is trained, on those features."""

    def __init__(self, model, train_samples, val_samples, spec, work_dir, reporter, device):
        self.model, self.spec, self.reporter, self.device = model, spec, reporter, device
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.trainable = model.get_classifier()
        for parameter in self.trainable.parameters():
            parameter.requires_grad_(True)
        features_path = work_dir / FEATURES_NAME
        if features_path.exists():
            cached = load_file(features_path)
        else:
            transform = create_transform(**resolve_model_data_config(model), is_training=False)
            cached = {}
            for split, samples in (("train", train_samples), ("val", val_samples)):
                cached[f"{split}_x"], cached[f"{split}_y"] = self._features(samples, transform)
            save_file(cached, features_path)
        self.train_x, self.train_y = cached["train_x"].to(device), cached["train_y"].to(device)
        self.val_x, self.val_y = cached["val_x"].to(device), cached["val_y"].to(device)

    @torch.inference_mode()
    def _features(self, samples, transform) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = [], []
        for images, targets in _loader(samples, transform, self.spec.batch_size, shuffle=False):
            self.reporter.check()
            pooled = self.model.forward_head(self.model.forward_features(images.to(self.device)), pre_logits=True)
            features.append(pooled.float().cpu())
            labels.append(targets)
        return torch.cat(features).contiguous(), torch.cat(labels).contiguous()

    def train_epoch(self, optimizer, criterion) -> tuple[float, int, float]:
        started = time.perf_counter()
        self.trainable.train()
        order = torch.randperm(len(self.train_y)).to(self.device)
        total_loss = 0.0
        for batch in order.split(self.spec.batch_size):
            self.reporter.check()
            loss = criterion(self.trainable(self.train_x[batch]), self.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
        return total_loss / len(order), len(order), time.perf_counter() - started

    @torch.inference_mode()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.trainable.eval()
        return self.trainable(self.val_x).float().cpu(), self.val_y.cpu()


class _FullFineTune:
    """Every layer trained, with timm's training augmentation for this model."""

    def __init__(self, model, train_samples, val_samples, spec, reporter, device):
        self.model, self.spec, self.reporter, self.device = model, spec, reporter, device
        self.trainable = model
        data_config = resolve_model_data_config(model)
        self.train_loader = _loader(
            train_samples, create_transform(**data_config, is_training=True), spec.batch_size, shuffle=True
        )
        self.val_loader = _loader(
            val_samples, create_transform(**data_config, is_training=False), spec.batch_size, shuffle=False
        )

    def train_epoch(self, optimizer, criterion) -> tuple[float, int, float]:
        started = time.perf_counter()
        self.model.train()
        total_loss, seen = 0.0, 0
        for images, targets in self.train_loader:
            self.reporter.check()
            images, targets = images.to(self.device), targets.to(self.device)
            loss = criterion(self.model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(targets)
            seen += len(targets)
        return total_loss / max(seen, 1), seen, time.perf_counter() - started

    @torch.inference_mode()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        logits, labels = [], []
        for images, targets in self.val_loader:
            self.reporter.check()
            logits.append(self.model(images.to(self.device)).float().cpu())
            labels.append(targets)
        return torch.cat(logits), torch.cat(labels)
