"""Transfer learning of a timm model. Pure ML: no HTTP and no database.

Strategies (see app/ml/spec.py for the hyperparameters):
- linear_probe: backbone frozen; its pooled features are computed once (eval mode, optionally
  with mirrored views) and cached; only the classifier is trained, on the cache.
- partial: the last `unfreeze_stages` of timm's own layer groups (model.group_matcher) train,
  together with the classifier; earlier layers, and their batch-norm statistics, stay frozen.
- full: every layer trains (layer-wise lr decay through create_optimizer_v2's layer_decay).
- lp_ft: a linear probe first, then a full fine-tune that starts from the probed head.

Every epoch reseeds torch, numpy and random from (seed, stage, epoch) and builds its loaders
from that seed, so a run resumed from the checkpoint written after an epoch continues exactly
as the uninterrupted run would; the checkpoint holds model, optimizer, scheduler, EMA, early-
stopping state, fp16's loss scale, history and the best weights so far.
"""

import contextlib
import copy
import functools
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from timm.data import Mixup, create_transform, resolve_model_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.models import group_modules, group_parameters
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed

from app.ml.backbone import fold_batch_norms
from app.ml.calibration import expected_calibration_error, fit_temperature
from app.ml.data import DecodedImages, ImageDataset, Sample, class_weights, eval_resize
from app.ml.metrics import classification_metrics
from app.ml.spec import RECIPES, Hyperparameters, total_epochs
from app.ml.tensor_augment import DeviceImages, TensorAugmentation

CHECKPOINT_NAME = "checkpoint.pt"
FEATURES_NAME = "features.safetensors"
IMAGE_CACHE_BYTES = 4 * 1024**3
PROBE_CHECKPOINT_SECONDS = 1.0


class Reporter(Protocol):
    def check(self) -> None:
        """Called often; raise to stop training (for example, the job was cancelled)."""

    def step(self, phase: str, done: int, total: int, images: int) -> None:
        """Called after each batch: `done` of `total` batches of `phase` ("features", "training",
        "validation"), the batch holding `images` images."""

    def epoch_end(self, record: dict[str, Any]) -> None:
        """Called after each epoch with its loss, validation metrics, speed and ETA."""


@dataclass
class TrainResult:
    model: torch.nn.Module  # on the CPU, in eval mode, holding the kept (best) weights
    metrics: dict[str, Any]  # validation metrics of the kept weights, with calibration
    temperature: float
    best_epoch: int
    history: list[dict[str, Any]]
    stopped_early: bool
    val_logits: torch.Tensor  # fp32 logits of the kept weights on the validation samples, in their order


def pick_device() -> torch.device:
    if torch.cuda.is_available():  # CUDA_VISIBLE_DEVICES decides which GPU this process sees
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device("cpu")


def trainable_parameter_names(model: torch.nn.Module, unfreeze_stages: int) -> set[str]:
    """The classifier plus the last `unfreeze_stages` layer groups, in timm's own grouping of the
    architecture (the grouping layer_decay uses), so it holds for any timm model."""
    groups = group_parameters(model, model.group_matcher(coarse=True))
    kept = sorted(groups)[-(unfreeze_stages + 1) :]
    names = {name for group in kept for name in groups[group]}
    classifier = model.get_classifier()
    names |= {name for name, p in model.named_parameters() if any(p is q for q in classifier.parameters())}
    return names


def fine_tune(
    model: torch.nn.Module,
    train_samples: list[Sample],
    val_samples: list[Sample],
    class_names: list[str],
    strategy: str,
    hp: Hyperparameters,
    seed: int,
    work_dir: Path,
    reporter: Reporter,
    device: torch.device | None = None,
    loader_context=None,
    augment_on_device: bool = True,
) -> TrainResult:
    """Train `model` (a timm model whose classifier has len(class_names) outputs) in place.

    `hp` must be resolved (app.ml.spec.resolve). `loader_context` is the multiprocessing context
    for DataLoader workers (a Celery pool process needs one that may start children).
    `augment_on_device`: augment kept training images in this process, on the device that trains
    (app/ml/tensor_augment.py), where the train transform allows; else loader processes do."""
    run = _Run(model, train_samples, val_samples, class_names, strategy, hp, seed, work_dir, reporter,
               device or pick_device(), loader_context, augment_on_device)  # fmt: skip
    return run.execute()


@dataclass
class _Stage:
    kind: str  # "probe" | "network"
    epochs: int
    lr: float


class _Run:
    def __init__(self, model, train_samples, val_samples, class_names, strategy, hp, seed, work_dir, reporter, device,
                 loader_context, augment_on_device=True):  # fmt: skip
        self.model, self.hp, self.seed, self.device = model, hp, seed, device
        self.augment_on_device = augment_on_device
        self.train_samples, self.val_samples, self.class_names = train_samples, val_samples, class_names
        self.strategy, self.work_dir, self.reporter, self.loader_context = strategy, work_dir, reporter, loader_context
        self.num_classes = len(class_names)
        self.total_epochs = total_epochs(strategy, hp)
        work_dir.mkdir(parents=True, exist_ok=True)

        if strategy == "linear_probe":
            self.stages = [_Stage("probe", hp.epochs, hp.lr)]
        elif strategy == "lp_ft":
            # The probe phase trains a head from zero, so it takes the probe recipe's rate.
            self.stages = [_Stage("probe", hp.lp_epochs, RECIPES["linear_probe"]["lr"]), _Stage("network", hp.epochs, hp.lr)]
        else:
            self.stages = [_Stage("network", hp.epochs, hp.lr)]

        self.amp_dtype = amp_dtype_for(device) if hp.amp else None
        self.memory_format = torch.channels_last if hp.channels_last else torch.contiguous_format
        model.to(device=device, memory_format=self.memory_format)

        self.data_config = resolve_model_data_config(model)  # the model's own: `img_size` is in it (build_model)
        self.eval_transform = create_transform(**self.data_config, is_training=False)
        self.train_transform = create_transform(
            **self.data_config, is_training=True, auto_augment=hp.aa, re_prob=hp.reprob
        )
        self.weights = class_weights(train_samples, self.num_classes) if hp.class_weighting == "auto" else None
        self.features: dict[str, torch.Tensor] | None = None
        self.frozen_modules: list[torch.nn.Module] = []

    # -- data -----------------------------------------------------------------------------------

    # Decoded when first needed: a probe whose features are cached already (resumed, or measured
    # by `auto`) never needs the training images' pixels.
    @functools.cached_property
    def train_images(self) -> DecodedImages | None:
        return self._decoded(self.train_samples)

    @functools.cached_property
    def val_images(self) -> DecodedImages | None:
        return self._decoded(self.val_samples)

    def _decoded(self, samples: list[Sample]) -> DecodedImages | None:
        if not self.hp.image_cache:
            return None
        return DecodedImages([path for path, _ in samples], eval_resize(self.eval_transform),
                             self.data_config["interpolation"], IMAGE_CACHE_BYTES, threads=os.cpu_count() or 1,
                             check=self.reporter.check)  # fmt: skip

    @functools.cached_property
    def _device_images(self) -> DeviceImages | None:
        """The training images on the device, where they are augmented there: asked for, every
        image kept decoded, a train transform with a tensor form, and room on a GPU."""
        if not self.augment_on_device or self.train_images is None or not self.train_images.complete:
            return None
        augmentation = TensorAugmentation.of(self.train_transform, self.device)
        if augmentation is None:
            return None
        if self.device.type == "cuda" and self.train_images.nbytes > torch.cuda.mem_get_info(self.device)[0] // 4:
            return None  # the network's activations and optimizer state come first
        labels = [label for _, label in self.train_samples]
        return DeviceImages(self.train_images.pixels, labels, augmentation, self.device)

    def _sampler(self, samples: list[Sample], generator: torch.Generator) -> torch.utils.data.Sampler:
        """The order of a training epoch: shuffled, or drawn class-balanced ('sampler')."""
        if self.hp.class_weighting == "sampler":
            per_sample = class_weights(samples, self.num_classes)[[label for _, label in samples]]
            return torch.utils.data.WeightedRandomSampler(per_sample, len(samples), generator=generator)
        return torch.utils.data.RandomSampler(samples, generator=generator)

    def _drop_last(self, samples: list[Sample]) -> bool:
        return self._mixup() is not None and len(samples) > self.hp.batch_size

    def _train_batches(self, epoch_seed: int) -> tuple[int, Iterable[tuple[torch.Tensor, torch.Tensor]]]:
        """How many batches a training epoch has, and the batches: augmented on the device, or
        loaded by loader processes."""
        if self._device_images is None:
            loader = self._loader(self.train_samples, self.train_transform, self.train_images, train=True,
                                  epoch_seed=epoch_seed)  # fmt: skip
            return len(loader), loader
        sampler = self._sampler(self.train_samples, torch.Generator().manual_seed(epoch_seed))
        order = torch.utils.data.BatchSampler(sampler, self.hp.batch_size, self._drop_last(self.train_samples))
        return len(order), self._device_images.batches(order)

    def _loader(self, samples, transform, images, *, train: bool, epoch_seed: int = 0, flip: bool = False):
        if flip:
            transform = _Flipped(transform)
        dataset = ImageDataset(samples, transform, images)
        generator = torch.Generator().manual_seed(epoch_seed)
        workers = self.hp.workers or 0
        if not train and self.device.type == "cpu" and images is not None and images.complete:
            # The eval transform of kept pixels is a crop and a copy (about 1 ms an image). On a
            # CPU, whose cores the forward pass uses already, a loader process then costs more than
            # it saves (handing batches over, cores taken from the forward pass): a probe's
            # feature pass over 245 hymenoptera photos took 1.3 s in-process against 1.7 s with one.
            workers = 0
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.hp.batch_size,
            sampler=self._sampler(samples, generator) if train else None,
            generator=generator,  # also seeds the loader processes (augmentation)
            drop_last=train and self._drop_last(samples),
            num_workers=workers,
            multiprocessing_context=self.loader_context if workers else None,
            pin_memory=self.device.type == "cuda",
        )

    def _mixup(self) -> Mixup | None:
        if not (self.hp.mixup or self.hp.cutmix):
            return None
        return Mixup(mixup_alpha=self.hp.mixup, cutmix_alpha=self.hp.cutmix, label_smoothing=self.hp.smoothing,
                     num_classes=self.num_classes)  # fmt: skip

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _criterion(self, soft_targets: bool) -> torch.nn.Module:
        if soft_targets:
            return SoftTargetCrossEntropy()
        weight = self.weights.to(self.device) if self.weights is not None else None
        return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=self.hp.smoothing)

    # -- linear-probe features ------------------------------------------------------------------

    def _probe_features(self) -> dict[str, torch.Tensor]:
        """Features of every view, cached in work_dir: a resumed run reads them back, and `auto`
        (app/ml/auto.py) leaves there the training split's, which it has computed already."""
        if self.features is None:
            path = self.work_dir / FEATURES_NAME
            self.features = load_file(path) if path.exists() else {}
            # The validation features in full precision, as the prediction endpoint computes them:
            # every epoch's metrics, the kept head, its calibration and the reported figures are
            # then those of the model served (a bf16 feature can flip a close call). Only the
            # training features take the faster bf16 path.
            views = [("train", self.train_samples, "train_images", False, False),
                     ("val", self.val_samples, "val_images", False, True)]  # fmt: skip
            if self.hp.flip_views:
                views.append(("train_flip", self.train_samples, "train_images", True, False))
            missing = [view for view in views if f"{view[0]}_x" not in self.features]
            for name, samples, images, flip, exact in missing:
                self.features[f"{name}_x"], self.features[f"{name}_y"] = self.features_of(
                    samples, getattr(self, images), flip, exact)  # fmt: skip
            if missing:
                save_file(self.features, path)
                self.__dict__.pop("_folded_backbone", None)  # its copy of the weights is not needed again
        return self.features

    def features_of(self, samples, images, flip: bool = False, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pooled(self._loader(samples, self.eval_transform, images, train=False, flip=flip), exact)

    @functools.cached_property
    def _folded_backbone(self) -> torch.nn.Module:
        """The frozen backbone with its batch norms folded into their convolutions, for the
        feature passes (app/ml/backbone.py). On a CPU, mobilenetv2_100's forward pass ran 1.6x
        faster in fp32 (within 1e-5) and 1.45x in bf16. With bf16 training features, the probes
        of both local backbones on hymenoptera and trashnet reached exactly the validation
        accuracy of fp32 features (bench/SPEED.md); unfolded bf16 features were one image off in
        two of the four."""
        example = torch.randn(2, *self.data_config["input_size"], device=self.device)
        return fold_batch_norms(self.model, example.contiguous(memory_format=self.memory_format))

    @torch.no_grad()  # not inference_mode: these tensors later feed autograd (probe, calibration)
    def _pooled(self, loader, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        backbone = self._folded_backbone  # in eval mode
        features, labels = [], []
        for done, (images, targets) in enumerate(loader, 1):
            self.reporter.check()
            with contextlib.nullcontext() if exact else self._autocast():
                pooled = backbone.forward_head(backbone.forward_features(self._to_device(images)), pre_logits=True)
            features.append(pooled.float().cpu())
            labels.append(targets)
            self.reporter.step("features", done, len(loader), len(targets))
        return torch.cat(features).contiguous(), torch.cat(labels).contiguous()

    # -- which parameters train -----------------------------------------------------------------

    def _prepare(self, stage: _Stage) -> torch.nn.Module:
        """Set requires_grad for the stage; return the module its optimizer covers."""
        if stage.kind == "probe":
            for parameter in self.model.parameters():
                parameter.requires_grad_(False)
            head = self.model.get_classifier()
            for parameter in head.parameters():
                parameter.requires_grad_(True)
            return head
        if self.strategy == "partial":
            trainable = trainable_parameter_names(self.model, self.hp.unfreeze_stages)
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(name in trainable)
            modules = group_modules(self.model, self.model.group_matcher(coarse=True))
            frozen_groups = sorted(modules)[: -(self.hp.unfreeze_stages + 1)]
            self.frozen_modules = [self.model.get_submodule(n) for g in frozen_groups for n in modules[g]]
        else:
            for parameter in self.model.parameters():
                parameter.requires_grad_(True)
        return self.model

    def _train_mode(self) -> None:
        self.model.train()
        for module in self.frozen_modules:  # frozen layers keep their pretrained batch-norm statistics
            module.eval()

    # -- one epoch ------------------------------------------------------------------------------

    def _probe_epoch(self, head, optimizer, epoch_seed) -> tuple[float, int]:
        features = self._probe_features()
        x, y = features["train_x"], features["train_y"]
        if self.hp.flip_views:
            x, y = torch.cat([x, features["train_flip_x"]]), torch.cat([y, features["train_flip_y"]])
        x, y = x.to(self.device), y.to(self.device)
        generator = torch.Generator().manual_seed(epoch_seed)
        if self.hp.class_weighting == "sampler":
            per_sample = class_weights([(None, int(label)) for label in y], self.num_classes)[y.cpu()]
            order = torch.multinomial(per_sample, len(y), replacement=True, generator=generator)
        else:
            order = torch.randperm(len(y), generator=generator)
        criterion = self._criterion(soft_targets=False)
        head.train()
        total = 0.0
        batches = order.to(self.device).split(self.hp.batch_size)
        for done, batch in enumerate(batches, 1):
            self.reporter.check()
            loss = criterion(head(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            self.reporter.step("training", done, len(batches), len(batch))
        return total / len(order), len(order)

    def _network_epoch(self, optimizer, ema, scaler, epoch_seed) -> tuple[float, int]:
        batches, loader = self._train_batches(epoch_seed)
        mixup = self._mixup()
        criterion = self._criterion(soft_targets=mixup is not None)
        accumulate = self.hp.grad_accum_steps
        self._train_mode()
        optimizer.zero_grad(set_to_none=True)
        total, seen = 0.0, 0
        for step, (images, targets) in enumerate(loader):
            self.reporter.check()
            images, targets = self._to_device(images), targets.to(self.device, non_blocking=True)
            if mixup is not None and len(targets) % 2 == 0:
                images, soft = mixup(images, targets)
                loss_targets = soft
            elif mixup is not None:  # timm's Mixup needs an even batch: give the odd one soft labels too
                loss_targets = torch.nn.functional.one_hot(targets, self.num_classes).float()
            else:
                loss_targets = targets
            with self._autocast():
                loss = criterion(self.model(images), loss_targets)
            scaler.scale(loss / accumulate).backward()
            if (step + 1) % accumulate == 0 or step + 1 == batches:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(self.model)
            total += loss.item() * len(targets)
            seen += len(targets)
            self.reporter.step("training", step + 1, batches, len(targets))
        return total / max(seen, 1), seen

    @torch.no_grad()  # not inference_mode: these tensors later feed autograd (probe, calibration)
    def _logits(self, kind: str, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "probe":
            features = self._probe_features()
            head = self.model.get_classifier().eval()
            return head(features["val_x"].to(self.device)).float().cpu(), features["val_y"]
        model = model or self.model
        model.eval()
        logits, labels = [], []
        loader = self._loader(self.val_samples, self.eval_transform, self.val_images, train=False)
        for done, (images, targets) in enumerate(loader, 1):
            self.reporter.check()
            with self._autocast():
                logits.append(model(self._to_device(images)).float().cpu())
            labels.append(targets)
            self.reporter.step("validation", done, len(loader), len(targets))
        return torch.cat(logits), torch.cat(labels)

    # -- the run --------------------------------------------------------------------------------

    def _better(self, metrics: dict, than: dict | None, min_delta: float = 0.0, metric: str | None = None) -> bool:
        metric = metric or self.hp.eval_metric
        if than is None:
            return True
        if metric == "val_loss":
            return metrics[metric] < than[metric] - min_delta
        return metrics[metric] > than[metric] + min_delta

    def execute(self) -> TrainResult:
        state = _load_checkpoint(self.work_dir)
        history: list[dict] = state["history"] if state else []
        best: dict | None = state["best"] if state else None
        start_stage, start_epoch = (state["stage"], state["epoch"]) if state else (0, 0)
        if state:
            self.model.load_state_dict(state["model"])
        stopped_early = state.get("stopped_early", False) if state else False
        epoch_seconds: list[float] = []
        saved_at = -math.inf

        for stage_index, stage in enumerate(self.stages):
            if stage_index < start_stage or stopped_early:
                continue
            trainable = self._prepare(stage)
            optimizer = create_optimizer_v2(
                trainable, opt=self.hp.opt, lr=stage.lr, weight_decay=self.hp.weight_decay,
                layer_decay=self.hp.layer_decay if stage.kind == "network" else None,
            )  # fmt: skip
            scheduler, _ = create_scheduler_v2(
                optimizer, sched=self.hp.sched, num_epochs=stage.epochs,
                warmup_epochs=min(self.hp.warmup_epochs, stage.epochs - 1),
            )  # fmt: skip
            ema = ModelEmaV3(self.model, decay=self.hp.model_ema_decay) if (self.hp.model_ema and stage.kind == "network") else None
            scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
            early = {"best": None, "bad_epochs": 0}
            first_epoch = 0
            if state and stage_index == start_stage:
                first_epoch = start_epoch
                if start_epoch:
                    optimizer.load_state_dict(state["optimizer"])
                    scheduler.load_state_dict(state["scheduler"])
                    if ema is not None and state.get("ema") is not None:
                        ema.load_state_dict(state["ema"])
                    if state.get("scaler"):  # fp16's loss scale: as the uninterrupted run has it now
                        scaler.load_state_dict(state["scaler"])
                    early = state["early"]

            for epoch in range(first_epoch, stage.epochs):
                started = time.perf_counter()
                epoch_seed = _seed_everything(self.seed, stage_index, epoch)
                if stage.kind == "probe":
                    train_loss, seen = self._probe_epoch(trainable, optimizer, epoch_seed)
                else:
                    train_loss, seen = self._network_epoch(optimizer, ema, scaler, epoch_seed)
                train_seconds = time.perf_counter() - started
                scheduler.step(epoch + 1)

                metrics = classification_metrics(*self._logits(stage.kind), self.class_names)
                candidate, source = metrics, "model"
                if ema is not None:
                    ema_metrics = classification_metrics(*self._logits(stage.kind, ema.module), self.class_names)
                    if self._better(ema_metrics, metrics):
                        candidate, source = ema_metrics, "ema"
                global_epoch = sum(s.epochs for s in self.stages[:stage_index]) + epoch + 1
                if self._better(candidate, best["metrics"] if best else None):
                    weights = (ema.module if source == "ema" else self.model).state_dict()
                    best = {"epoch": global_epoch, "metrics": candidate, "source": source, "weights": copy.deepcopy(weights)}

                if self.hp.early_stopping and stage_index == len(self.stages) - 1:
                    rule = self.hp.early_stopping
                    if self._better(candidate, early["best"], rule.min_delta, rule.metric):
                        early = {"best": candidate, "bad_epochs": 0}
                    else:
                        early["bad_epochs"] += 1
                    stopped_early = early["bad_epochs"] >= rule.patience

                epoch_seconds.append(time.perf_counter() - started)
                remaining = 0 if stopped_early else self.total_epochs - global_epoch
                record = {
                    "epoch": global_epoch,
                    "epochs": self.total_epochs,
                    "stage": "linear_probe" if stage.kind == "probe" else self.strategy,
                    "train_loss": train_loss,
                    "val_loss": metrics["val_loss"],
                    "val_accuracy": metrics["val_accuracy"],
                    "val_accuracy_ci95": metrics["val_accuracy_ci95"],
                    "macro_f1": metrics["macro_f1"],
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_second": seen / max(train_seconds, 1e-9),
                    "eta_seconds": remaining * sum(epoch_seconds) / len(epoch_seconds),
                }
                if ema is not None:
                    record["ema_val_accuracy"] = ema_metrics["val_accuracy"]
                history.append(record)
                # A probe's epoch takes milliseconds on cached features, far less than writing the
                # checkpoint (the whole model): it is written after its first and last epochs and at
                # most once a second between, and a resumed probe repeats the few epochs since.
                last = epoch + 1 == stage.epochs or stopped_early
                if stage.kind == "network" or last or time.perf_counter() - saved_at >= PROBE_CHECKPOINT_SECONDS:
                    saved_at = time.perf_counter()
                    _save_checkpoint(self.work_dir, {
                        "stage": stage_index, "epoch": epoch + 1, "model": self.model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None, "scaler": scaler.state_dict(),
                        "early": early, "history": history, "best": best, "stopped_early": stopped_early,
                    })  # fmt: skip
                self.reporter.epoch_end(record)
                if stopped_early:
                    break

        return self._finish(best, history, stopped_early)

    def _finish(self, best: dict, history: list[dict], stopped_early: bool) -> TrainResult:
        self.model.load_state_dict(best["weights"])
        # The reported metrics and the calibration are those of what will be served: the kept
        # weights on the validation split, in full precision as the prediction endpoint runs them
        # (an epoch's own evaluation may have run in bf16, which can flip a close call).
        kind = "probe" if self.strategy == "linear_probe" else "network"
        self.amp_dtype = None
        logits, targets = self._logits(kind)
        temperature = fit_temperature(logits, targets)
        metrics = classification_metrics(logits, targets, self.class_names)
        metrics["calibration"] = {
            "temperature": temperature,
            "ece_before": expected_calibration_error(logits, targets),
            "ece_after": expected_calibration_error(logits / temperature, targets),
        }
        metrics["weights_from"] = best["source"]
        self.model.to(device="cpu", memory_format=torch.contiguous_format).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        return TrainResult(self.model, metrics, temperature, best["epoch"], history, stopped_early, logits)


@dataclass
class ProbeFeatures:
    x: torch.Tensor
    y: torch.Tensor
    decode_seconds: float  # decoding the images into the cache that fine-tuning also builds
    forward_seconds: float  # the backbone's forward pass over the decoded images


def probe_features(
    model: torch.nn.Module, samples: list[Sample], hp: Hyperparameters, device: torch.device, reporter: Reporter,
    loader_context=None,
) -> ProbeFeatures:  # fmt: skip
    """The features and labels of `samples` that a linear probe of `model` trains on, computed exactly
    as fine_tune computes them (same transform, batches and precision), so that they can be cached
    for it; and how long decoding and the forward pass took, from which `auto` estimates costs."""
    with tempfile.TemporaryDirectory() as work_dir:
        started = time.perf_counter()
        run = _Run(model, samples, [], [], "linear_probe", hp, 0, Path(work_dir), reporter, device, loader_context)
        images = run.train_images
        decoded = time.perf_counter()
        x, y = run.features_of(samples, images)
        return ProbeFeatures(x, y, decoded - started, time.perf_counter() - decoded)


class _Flipped:
    """A transform followed by a horizontal flip: the mirrored view for linear-probe features."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return torch.flip(self.transform(image), dims=[-1])


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """bf16 where the device has it (no loss scaling needed), else fp16 with a GradScaler."""
    if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _seed_everything(seed: int, stage: int, epoch: int) -> int:
    """One seed per (run, stage, epoch) for torch, numpy (timm's Mixup) and random (RandAugment)."""
    epoch_seed = (seed * 1_000_003 + stage * 10_007 + epoch) % 2**31
    random_seed(epoch_seed)
    return epoch_seed


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
