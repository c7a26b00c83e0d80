"""Validation accuracy of every strategy on both backbones in ../shared, default settings.

    python bench/accuracy_table.py [--arch NAME ...] [--strategy NAME ...]

Runs the engine exactly as a job with default hyperparameters would (same resolution of "auto"
values), on hymenoptera's own train/val split, and prints a Markdown table. The row marked
"default" is the strategy that `"strategy": "auto"` picks for this dataset.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ml.backbone import build_model  # noqa: E402
from app.ml.spec import STRATEGIES, Hyperparameters, choose_strategy, resolve, resolve_for_device  # noqa: E402
from app.ml.train import fine_tune  # noqa: E402
from bench.handwritten import CLASSES, WEIGHTS, samples  # noqa: E402


class Quiet:
    def check(self):
        pass

    def epoch_end(self, record):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="*", default=sorted(WEIGHTS))
    parser.add_argument("--strategy", nargs="*", default=list(STRATEGIES))
    args = parser.parse_args()
    train, val = samples("train"), samples("val")
    default, _ = choose_strategy(len(train))
    print("| backbone | strategy | epochs | val accuracy | macro F1 | ECE before → after | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch in args.arch:
        for strategy in args.strategy:
            hp = resolve_for_device(resolve(Hyperparameters(), strategy), strategy, "cpu")
            started = time.perf_counter()
            model = build_model(arch, len(CLASSES), weights_file=WEIGHTS[arch])
            with tempfile.TemporaryDirectory() as work_dir:
                result = fine_tune(model, train, val, CLASSES, strategy, hp, 0, Path(work_dir), Quiet(), torch.device("cpu"))
            seconds = time.perf_counter() - started
            calibration = result.metrics["calibration"]
            label = f"{strategy} (default)" if strategy == default else strategy
            print(
                f"| {arch} | {label} | {len(result.history)} | {result.metrics['val_accuracy']:.4f} | "
                f"{result.metrics['macro_f1']:.4f} | {calibration['ece_before']:.3f} → {calibration['ece_after']:.3f} | "
                f"{seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
