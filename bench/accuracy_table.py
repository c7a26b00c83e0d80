"""Validation accuracy of every strategy, of `auto` and of hand-written references, in one run.

    python bench/accuracy_table.py [--dataset trashnet hymenoptera] [--arch NAME ...]
                                   [--strategy NAME ...] [--budgets 60 600] [--no-references]
                                   [--augment-by-loaders]

For each dataset in ../shared (its own train/val split): the engine exactly as a job runs it with
default hyperparameters (same resolution of unset values), for every backbone and strategy; then
`auto` at each budget, asked for the first backbone with the others as candidates, measured by
cross-validation on the training split and then trained on all of it; then the hand-written
references of bench/handwritten.py on the same split (the PyTorch tutorial's two recipes,
shortened to 5 epochs, and a scikit-learn logistic-regression probe). Prints a Markdown table with
each accuracy's Wilson 95% interval for the validation size, and the seconds each row took.
`--augment-by-loaders`: the rows' training images are augmented by loader processes with Pillow,
as before app/ml/tensor_augment.py, instead of in the training process (the engine's default);
`auto`'s cross-validation of its candidates keeps the default.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ml import auto  # noqa: E402
from app.ml.backbone import build_model  # noqa: E402
from app.ml.metrics import wilson_interval  # noqa: E402
from app.ml.spec import STRATEGIES, Hyperparameters, resolve, resolve_for_device  # noqa: E402
from app.ml.train import FEATURES_NAME, fine_tune  # noqa: E402
from bench.handwritten import HYMENOPTERA, TRASHNET, WEIGHTS, classes, finetune_tutorial, frozen_tutorial, logistic_probe, samples  # noqa: E402,E501

DATASETS = {"trashnet": TRASHNET, "hymenoptera": HYMENOPTERA}
CPU = torch.device("cpu")


class Quiet:
    def check(self):
        pass

    def step(self, phase, done, total, images):
        pass

    def epoch_end(self, record):
        pass


def train(arch: str, strategy: str, root: Path, features: dict | None = None, augment_on_device: bool = True):
    names, train_samples, val_samples = classes(root), samples("train", root), samples("val", root)
    hp = resolve_for_device(resolve(Hyperparameters(), strategy), "cpu")
    model = build_model(arch, len(names), weights_file=WEIGHTS[arch])
    with tempfile.TemporaryDirectory() as work_dir:
        if features is not None:  # what `auto` computed already, as a job's final training reads it back
            save_file(features, Path(work_dir) / FEATURES_NAME)
        return fine_tune(model, train_samples, val_samples, names, strategy, hp, 0, Path(work_dir), Quiet(), CPU,
                         augment_on_device=augment_on_device)  # fmt: skip


def search(archs: list[str], root: Path, budget: float) -> auto.Choice:
    names = classes(root)

    def backbone(arch):
        build = lambda: build_model(arch, len(names), weights_file=WEIGHTS[arch])  # noqa: E731
        return auto.Backbone(arch, build, sum(p.numel() for p in build().parameters()))

    with tempfile.TemporaryDirectory() as work_dir:
        return auto.search([backbone(a) for a in archs], samples("train", root), names, Hyperparameters(), 0, budget,
                           Path(work_dir) / "auto", lambda: None, lambda trial: None, CPU)  # fmt: skip


def row(dataset, arch, method, accuracy, val_images, macro_f1, seconds, note=""):
    low, high = wilson_interval(round(accuracy * val_images), val_images)
    f1 = f"{macro_f1:.4f}" if macro_f1 is not None else "—"
    print(f"| {dataset} | {arch} | {method} | {accuracy:.4f} ({low:.3f}–{high:.3f}) | {f1} | {seconds:.0f} | {note} |",
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--arch", nargs="*", default=sorted(WEIGHTS))
    parser.add_argument("--strategy", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--budgets", nargs="*", type=float, default=[60, 600])
    parser.add_argument("--no-references", action="store_true")
    parser.add_argument("--augment-by-loaders", action="store_true")
    args = parser.parse_args()
    print("| dataset | backbone | method | val accuracy (95% interval) | macro F1 | seconds | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dataset in args.dataset:
        root = DATASETS[dataset]
        val_images = len(samples("val", root))
        for arch in args.arch:
            for strategy in args.strategy:
                started = time.perf_counter()
                result = train(arch, strategy, root, augment_on_device=not args.augment_by_loaders)
                metrics = result.metrics
                row(dataset, arch, strategy, metrics["val_accuracy"], val_images, metrics["macro_f1"],
                    time.perf_counter() - started, f"{len(result.history)} epochs")  # fmt: skip
        for budget in args.budgets:
            started = time.perf_counter()
            choice = search(args.arch, root, budget)
            result = train(choice.backbone, choice.strategy, root, choice.features, not args.augment_by_loaders)
            measured = [t for t in choice.record["trials"] if t["skipped"] is None]
            tried = ", ".join(f"{t['strategy']}/{t['backbone']} {t['cv_accuracy']:.3f} in {t['seconds']:.0f} s"
                              + (f" (estimated {t['estimated_seconds']:.0f} s)" if t["estimated_seconds"] else "")
                              for t in measured)  # fmt: skip
            note = f"chose {choice.strategy} on {choice.backbone}; out-of-fold: {tried}; {len(measured)} of " \
                   f"{len(choice.record['trials'])} candidates measured"  # fmt: skip
            row(dataset, f"{args.arch[0]} (+ others)", f"auto, budget {budget:.0f} s", result.metrics["val_accuracy"],
                val_images, result.metrics["macro_f1"], time.perf_counter() - started, note)  # fmt: skip
        if args.no_references:
            continue
        for arch in args.arch:
            for name, reference in [("hand-written: sklearn logistic regression", logistic_probe),
                                    ("hand-written: tutorial, frozen", frozen_tutorial),
                                    ("hand-written: tutorial, fine-tuning", finetune_tutorial)]:  # fmt: skip
                outcome = reference(arch, root=root)
                epochs = f"{outcome['epochs']} epochs, best on val" if outcome["epochs"] else ""
                row(dataset, arch, name, outcome["val_accuracy"], val_images, None, outcome["seconds"], epochs)


if __name__ == "__main__":
    main()
