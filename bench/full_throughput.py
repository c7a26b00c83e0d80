"""`full` fine-tuning throughput of the engine against a hand-written timm loop, in one run.

    python bench/full_throughput.py [--arch mobilenetv2_100] [--epochs 2] [--batch-size 32] [--device cuda]

Same model, batch size, data (hymenoptera train, 245 photos, `--repeat` times per epoch: on a GPU
an epoch of 245 photos is too short to measure), DataLoader workers and threads for all rows; the figure is training images/s of the last epoch. Ratios are against the baseline
measured here, never against numbers from another run.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ml.backbone import build_model  # noqa: E402
from app.ml.spec import Hyperparameters, resolve, resolve_for_device  # noqa: E402
from app.ml.train import fine_tune  # noqa: E402
from bench.handwritten import CLASSES, WEIGHTS, full_loop_throughput, samples  # noqa: E402


class LastEpoch:
    def __init__(self):
        self.rate = 0.0

    def check(self):
        pass

    def step(self, phase, done, total, images):
        pass

    def epoch_end(self, record):
        self.rate = record["images_per_second"]


def engine_throughput(arch: str, epochs: int, batch_size: int, workers: int, device: str, repeat: int,
                      augment_on_device: bool = True, **options) -> float:  # fmt: skip
    hp = Hyperparameters(epochs=epochs, batch_size=batch_size, workers=workers, **options)
    hp = resolve_for_device(resolve(hp, "full"), device)
    model = build_model(arch, 2, weights_file=WEIGHTS[arch])
    reporter = LastEpoch()
    with tempfile.TemporaryDirectory() as work_dir:
        fine_tune(model, samples("train") * repeat, samples("val"), CLASSES, "full", hp, 0, Path(work_dir), reporter,
                  torch.device(device), augment_on_device=augment_on_device)  # fmt: skip
    return reporter.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mobilenetv2_100", choices=sorted(WEIGHTS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1, help="each epoch goes through the training photos this many times")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    workers = resolve_for_device(Hyperparameters(), args.device).workers
    common = (args.arch, args.epochs, args.batch_size, workers, args.device, args.repeat)

    baseline = full_loop_throughput(args.arch, args.batch_size, args.epochs, workers, args.device, args.repeat)
    rows = [
        ("hand-written timm loop (fp32)", baseline),
        ("engine, fp32, no image cache", engine_throughput(*common, image_cache=False, amp=False, channels_last=False)),
        ("engine defaults, no image cache", engine_throughput(*common, image_cache=False)),
        ("engine defaults, image cache, augmented by loader processes", engine_throughput(*common, augment_on_device=False)),
        ("engine defaults (image cache, augmented on the device)", engine_throughput(*common)),
    ]
    defaults = resolve_for_device(Hyperparameters(), args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.arch}, full fine-tune on {where}, batch {args.batch_size}, {workers} DataLoader worker(s), "
          f"{os.cpu_count()} cores; engine defaults here: amp={defaults.amp}, "
          f"channels_last={defaults.channels_last}")  # fmt: skip
    for name, rate in rows:
        print(f"{name:60s} {rate:7.1f} images/s   {rate / baseline:5.2f}x")


if __name__ == "__main__":
    main()
