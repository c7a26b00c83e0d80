"""`strategy: "auto"`: choose the backbone and the strategy by measuring them on the training split.

Pure ML: no HTTP and no database. app/jobs/runner.py runs `search` before training a job whose
strategy is "auto", records what it measured and trains the winner on the whole training split.

1. The requested backbone's linear probe is measured first, by stratified k-fold cross-validation
   on the training split: every training image is predicted once by a probe that did not train on
   it. The validation split, whose accuracy the job reports, is never looked at. The same folds,
   trained on half their images, give the probe's learning curve.
2. Then, while the budget allows (each candidate's cost is estimated from the feature pass
   measured before it, and a candidate that would overrun is skipped): the linear probes of the
   other backbones with local weights, ranked as sweeps rank them (accuracy, then macro F1); then
   `partial` and `lp_ft` on the best-ranked backbone, in the order that the data's size and the
   learning curve suggest.
3. The winner is the candidate with the best out-of-fold accuracy among those that beat the
   requested backbone's probe beyond noise on the same images: of the images on which the two
   disagree, the candidate must get right more than the probe does by more than one standard
   error of that difference (sqrt of the number of disagreements, as in McNemar's test).
   Otherwise the probe stays, so `auto` is never worse than the probe by more than that noise.
"""

import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.model_selection import StratifiedKFold

from app.ml.backbone import fold_batch_norms
from app.ml.data import Sample
from app.ml.metrics import classification_metrics
from app.ml.spec import Hyperparameters, resolve, resolve_for_device
from app.ml.train import FEATURES_NAME, ProbeFeatures, amp_dtype_for, fine_tune, probe_features

FOLDS = 3
MIN_PER_CLASS_TO_FINE_TUNE = 20  # below this, a fold's held-out part has a handful of images per class
RISING = 0.02  # out-of-fold accuracy gained from half to all of the data: the probe is still data-limited
# What a training step of an image costs, in forward passes at the precision it trains in. Measured
# on trashnet folds on a 2-core CPU in bf16, it varies with the architecture: `partial` 1.5
# (mobilenetv2_100) and 1.0 (tf_efficientnet_lite0), `lp_ft` 3.9 and 0.6. These middling values
# only decide what is worth starting: a candidate whose first fold shows that it cannot finish
# within the budget is stopped there, and one that runs out of budget all the same is stopped then.
TRAIN_COST = {"partial": 1.2, "lp_ft": 2.0}


@dataclass
class Backbone:
    name: str  # as a job names it: "architecture" or "architecture.tag"
    build: Callable[[], torch.nn.Module]  # a fresh pretrained model with a zeroed head of the right size
    num_params: int


@dataclass
class Trial:
    backbone: str
    strategy: str
    estimated_seconds: float | None = None
    seconds: float | None = None
    cv_accuracy: float | None = None
    cv_accuracy_ci95: list[float] | None = None
    cv_macro_f1: float | None = None
    skipped: str | None = None  # why it was not measured
    correct: torch.Tensor | None = field(default=None, repr=False)  # per training image, out of fold

    def record(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "correct"}

    def describe(self) -> str:
        if self.skipped:
            return f"{self.strategy} on {self.backbone}: skipped, {self.skipped}"
        low, high = self.cv_accuracy_ci95
        return (f"{self.strategy} on {self.backbone}: {self.cv_accuracy:.4f} out-of-fold accuracy "
                f"(95% interval {low:.3f}-{high:.3f}) in {self.seconds:.1f} s")  # fmt: skip


@dataclass
class Choice:
    backbone: str
    strategy: str
    reason: str
    record: dict[str, Any]  # everything measured, for the job
    features: dict[str, torch.Tensor] | None = None  # the winning probe's training-split features, to reuse


class _OutOfBudget(Exception):
    """A candidate stopped for the budget; the message says when and why."""


class Quiet:
    """The job's reporter for heartbeats and cancellation, without per-epoch events: a fold (or the
    probe the job serves while it searches) is not the job. Past `deadline` (a candidate's share of
    the budget) it stops the candidate."""

    def __init__(self, check: Callable[[], None]):
        self.job_check = check
        self.deadline: float | None = None

    def check(self) -> None:
        self.job_check()
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise _OutOfBudget("when the budget ran out")

    def step(self, phase: str, done: int, total: int, images: int) -> None:
        pass

    def epoch_end(self, record: dict[str, Any]) -> None:
        pass


def unmeasured(backbone: str, why: str) -> Choice:
    return Choice(backbone, "linear_probe", f"the linear probe, unmeasured: {why}", {"trials": [], "reason": why})


def search(
    backbones: list[Backbone], samples: list[Sample], class_names: list[str], hp: Hyperparameters, seed: int,
    budget_seconds: float, work_dir: Path, check: Callable[[], None], note: Callable[[Trial], None],
    device: torch.device, loader_context=None, serve_probe: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Choice:  # fmt: skip
    """`backbones[0]` is the requested one; `samples` the training split only; `hp` the job's
    hyperparameters as asked (unset fields are resolved per candidate); `note` is told of each trial;
    `serve_probe` is given the requested backbone's training-split features as soon as they exist."""
    requested = backbones[0].name
    per_class = Counter(label for _, label in samples)
    smallest = min(per_class.get(label, 0) for label in range(len(class_names)))
    if budget_seconds <= 0:
        return unmeasured(requested, "budget_seconds is 0")
    if smallest < 2:
        return unmeasured(requested, f"a class has {smallest} training image(s): too few to cross-validate")
    shutil.rmtree(work_dir, ignore_errors=True)
    search = _Search(samples, class_names, hp, seed, min(FOLDS, smallest), work_dir, Quiet(check), device, loader_context)
    started = time.perf_counter()

    def run(trial: Trial, measure: Callable[[], torch.Tensor]) -> Trial:
        """Measure a candidate if its estimate fits what is left of the budget; one that runs past
        the budget all the same (estimates are estimates) is stopped there, and skipped."""
        left = budget_seconds - (time.perf_counter() - started)
        if trial.estimated_seconds is not None and trial.estimated_seconds > left:
            trial.skipped = f"estimated {trial.estimated_seconds:.0f} s, {max(left, 0):.0f} s of the budget left"
            note(trial)
            return trial
        begun = time.perf_counter()
        search.reporter.deadline = started + budget_seconds if trial.estimated_seconds is not None else None
        try:
            search.score(trial, measure())
        except _OutOfBudget as stopped:
            trial.skipped = (f"stopped after {time.perf_counter() - begun:.0f} s, {stopped} "
                             f"(estimated {trial.estimated_seconds:.0f} s)")  # fmt: skip
        finally:
            search.reporter.deadline = None
        trial.seconds = time.perf_counter() - begun
        note(trial)
        return trial

    base_model = backbones[0].build()
    if serve_probe is not None:  # served as soon as its features exist, before it is measured
        search.extract(requested, base_model)
        begun = time.perf_counter()
        serve_probe(search.features[requested])
        started += time.perf_counter() - begun  # training the fallback is not measuring: off the budget
    baseline = run(Trial(requested, "linear_probe"), lambda: search.probe(requested, base_model))
    if serve_probe is not None:  # its feature pass, before serving, is part of measuring it
        baseline.seconds += search.timings[requested].decode_seconds + search.timings[requested].forward_seconds
    half = search.probe_on_half(requested, base_model)
    curve = {"half_data": half, "all_data": baseline.cv_accuracy}
    trials = [baseline]
    for backbone in backbones[1:]:
        measured = search.timings[requested]
        estimate = (measured.decode_seconds + measured.forward_seconds) * backbone.num_params / backbones[0].num_params
        trials.append(run(Trial(backbone.name, "linear_probe", estimate), lambda b=backbone: search.probe(b.name, b.build())))
    probes = sorted((t for t in trials if t.cv_accuracy is not None), key=lambda t: (-t.cv_accuracy, -t.cv_macro_f1))
    best = next(b for b in backbones if b.name == probes[0].backbone)

    order, why_order = _fine_tune_order(smallest, curve)
    for strategy in order:
        trial = Trial(best.name, strategy, search.estimate(best, strategy))
        trials.append(run(trial, lambda s=strategy: search.network(best, s)))
    if not order:
        for strategy in ("partial", "lp_ft"):
            trials.append(Trial(best.name, strategy, skipped=why_order))
            note(trials[-1])

    winner, reason = _pick(baseline, trials)
    shutil.rmtree(work_dir, ignore_errors=True)
    record = {
        "budget_seconds": budget_seconds, "seconds": time.perf_counter() - started, "folds": search.folds,
        "train_images": len(samples), "learning_curve": curve, "fine_tune_order": why_order,
        "trials": [t.record() for t in trials], "winner": {"backbone": winner.backbone, "strategy": winner.strategy},
        "reason": reason,
    }  # fmt: skip
    features = search.features.get(winner.backbone) if winner.strategy == "linear_probe" else None
    return Choice(winner.backbone, winner.strategy, reason, record, features)


def _fine_tune_order(smallest: int, curve: dict[str, float]) -> tuple[list[str], str]:
    """Which fine-tuning candidates to measure, in which order, and why."""
    if smallest < MIN_PER_CLASS_TO_FINE_TUNE:
        return [], (f"the smallest class has {smallest} training images (fewer than {MIN_PER_CLASS_TO_FINE_TUNE}): "
                    "fine-tuning measured on folds this small would be noise")  # fmt: skip
    gain = curve["all_data"] - curve["half_data"]
    if gain > RISING:
        return ["partial", "lp_ft"], (f"the probe still gains from more data ({gain:+.3f} from half to all of it): "
                                      "`partial` first, as it moves fewer weights than `lp_ft`")  # fmt: skip
    return ["lp_ft", "partial"], (f"the probe has levelled off ({gain:+.3f} from half to all of the data): the "
                                  "features are the limit, so `lp_ft`, which adapts all of them, first")  # fmt: skip


def _pick(baseline: Trial, trials: list[Trial]) -> tuple[Trial, str]:
    beating = []
    for trial in trials[1:]:
        if trial.correct is None:
            continue
        gained = int((trial.correct & ~baseline.correct).sum())
        lost = int((~trial.correct & baseline.correct).sum())
        if gained - lost > math.sqrt(gained + lost):
            beating.append((trial, gained, lost))
    if not beating:
        return baseline, (f"the linear probe of {baseline.backbone}: no candidate beat its out-of-fold accuracy "
                          f"({baseline.cv_accuracy:.4f}) beyond noise")  # fmt: skip
    trial, gained, lost = max(beating, key=lambda row: (row[0].cv_accuracy, row[0].cv_macro_f1))
    return trial, (
        f"{trial.strategy} on {trial.backbone}: {trial.cv_accuracy:.4f} out-of-fold accuracy against the linear probe "
        f"of {baseline.backbone}'s {baseline.cv_accuracy:.4f}, on the same {len(baseline.correct)} training images "
        f"(right on {gained} that the probe got wrong, wrong on {lost} that it got right: "
        f"{(gained - lost) / math.sqrt(gained + lost):.1f} standard errors, more than noise)"
    )


class _Search:
    def __init__(self, samples, class_names, hp, seed, folds, work_dir, reporter, device, loader_context):
        self.samples, self.class_names, self.hp, self.seed, self.folds = samples, class_names, hp, seed, folds
        self.work_dir, self.reporter, self.device, self.loader_context = work_dir, reporter, device, loader_context
        self.labels = torch.tensor([label for _, label in samples])
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
        self.splits = [(torch.as_tensor(tr), torch.as_tensor(te)) for tr, te in splitter.split(np.zeros(len(samples)), self.labels)]
        self.features: dict[str, dict[str, torch.Tensor]] = {}
        self.timings: dict[str, ProbeFeatures] = {}  # each backbone's decode and forward seconds
        self.speedups: dict[tuple, float] = {}  # (backbone, amp, channels_last): timed once

    def hp_for(self, strategy: str) -> Hyperparameters:
        return resolve_for_device(resolve(self.hp, strategy), self.device.type)

    def score(self, trial: Trial, logits: torch.Tensor) -> None:
        metrics = classification_metrics(logits, self.labels, self.class_names)
        trial.cv_accuracy, trial.cv_accuracy_ci95 = metrics["val_accuracy"], metrics["val_accuracy_ci95"]
        trial.cv_macro_f1 = metrics["macro_f1"]
        trial.correct = logits.argmax(dim=1) == self.labels

    def extract(self, name: str, model: torch.nn.Module) -> None:
        """The training split's features for the probe of `name`, and how long they took."""
        measured = probe_features(model, self.samples, self.hp_for("linear_probe"), self.device, self.reporter,
                                  self.loader_context)  # fmt: skip
        self.timings[name] = measured
        self.features[name] = {"train_x": measured.x, "train_y": measured.y}

    def probe(self, name: str, model: torch.nn.Module) -> torch.Tensor:
        if name not in self.features:
            self.extract(name, model)
        return self._probe_folds(name, model, self.splits)

    def probe_on_half(self, name: str, model: torch.nn.Module) -> float:
        """Out-of-fold accuracy of probes trained on every other image of each fold's training part
        (samples are in class order, so that is half of each class)."""
        logits = self._probe_folds(name, model, [(tr[::2], te) for tr, te in self.splits])
        return (logits.argmax(dim=1) == self.labels).sum().item() / len(self.samples)

    def _probe_folds(self, name: str, model: torch.nn.Module, splits) -> torch.Tensor:
        x, y = self.features[name]["train_x"], self.features[name]["train_y"]
        hp = self.hp_for("linear_probe").model_copy(update={"image_cache": False})  # it reads cached features only
        logits = torch.zeros(len(self.samples), len(self.class_names))
        for index, (tr, te) in enumerate(splits):
            fold_dir = self.work_dir / f"{name}-probe-{index}"
            fold_dir.mkdir(parents=True)
            save_file({"train_x": x[tr], "train_y": y[tr], "val_x": x[te], "val_y": y[te]}, fold_dir / FEATURES_NAME)
            for parameter in model.get_classifier().parameters():  # every fold starts from the zeroed head
                torch.nn.init.zeros_(parameter)
            logits[te] = self._fit(model, tr, te, "linear_probe", hp, fold_dir)
            shutil.rmtree(fold_dir)
        return logits

    def network(self, backbone: Backbone, strategy: str) -> torch.Tensor:
        logits = torch.zeros(len(self.samples), len(self.class_names))
        started = time.perf_counter()
        for index, (tr, te) in enumerate(self.splits):
            fold_dir = self.work_dir / f"{backbone.name}-{strategy}-{index}"
            logits[te] = self._fit(backbone.build(), tr, te, strategy, self.hp_for(strategy), fold_dir)
            shutil.rmtree(fold_dir)
            first = time.perf_counter() - started
            deadline = self.reporter.deadline
            if index == 0 and deadline is not None and started + first * self.folds > deadline:
                raise _OutOfBudget(f"as its first fold took {first:.0f} s: {self.folds} would run past the budget")
        return logits

    def _fit(self, model, tr, te, strategy, hp, fold_dir) -> torch.Tensor:
        train = [self.samples[i] for i in tr.tolist()]
        held_out = [self.samples[i] for i in te.tolist()]
        result = fine_tune(model, train, held_out, self.class_names, strategy, hp, self.seed, fold_dir, self.reporter,
                           self.device, self.loader_context)  # fmt: skip
        return result.val_logits

    def estimate(self, backbone: Backbone, strategy: str) -> float:
        """Seconds to cross-validate a fine-tuning strategy, from this backbone's measured feature
        pass: in every fold, decoding the images once, then epochs x (training steps + evaluation)."""
        measured, hp = self.timings[backbone.name], self.hp_for(strategy)
        forward = measured.forward_seconds / len(self.samples) / self._speedup(backbone, hp)
        held_out = len(self.samples) / self.folds
        steps = (len(self.samples) - held_out) * TRAIN_COST[strategy] + held_out
        per_fold = measured.decode_seconds + hp.epochs * steps * forward
        if strategy == "lp_ft":
            per_fold += len(self.samples) * forward  # the probe phase's feature pass (its epochs cost next to nothing)
        return self.folds * per_fold

    def _speedup(self, backbone: Backbone, hp: Hyperparameters) -> float:
        """How many times faster than the probe's feature pass a training forward pass runs. The
        probe's runs with its batch norms folded (about 1.45x faster on this machine's cores) at its
        precision; training's runs the model as it is, at `hp`'s precision and memory format (bf16
        was from about 1.4x to 3x faster than fp32 here). Timed once per backbone and precision on
        one small batch of noise (speed does not depend on the pixels), after a warm-up."""
        key = (backbone.name, hp.amp, hp.channels_last)  # `partial` and `lp_ft` train at the same precision
        if key not in self.speedups:
            model = backbone.build().eval()
            size = model.pretrained_cfg["input_size"]
            folded = fold_batch_norms(model, torch.randn(2, *size))
            probe = _forward_seconds(folded, size, self.hp_for("linear_probe"), self.device)
            self.speedups[key] = probe / _forward_seconds(model, size, hp, self.device)
        return self.speedups[key]


@torch.no_grad()
def _forward_seconds(model: torch.nn.Module, input_size, hp: Hyperparameters, device: torch.device) -> float:
    memory_format = torch.channels_last if hp.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    batch = torch.randn(8, *input_size, device=device).contiguous(memory_format=memory_format)
    with torch.autocast(device.type, dtype=amp_dtype_for(device), enabled=bool(hp.amp)):
        model(batch)  # warm-up: kernels are chosen on the first call
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started
