"""Hand-written timm training code: the baselines the engine is measured against, in the same run.

The loops follow the PyTorch "Transfer Learning for Computer Vision" tutorial's two recipes,
written by hand with timm: an ImageFolder-style dataset read from disk every epoch, timm's
transforms, a plain fp32 loop. The probe is the textbook one: scikit-learn's logistic regression
on timm's pooled features. They are deliberately what a user would write without VisionTune.
"""

import os
import time
from pathlib import Path

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VISIONTUNE_SHARED_DIR", REPO.parent / "shared"))  # elsewhere on a GPU machine
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
TRASHNET = SHARED / "datasets" / "trashnet"
WEIGHTS = {
    "mobilenetv2_100": SHARED / "weights" / "mobilenetv2_100.tv_in1k.safetensors",
    "tf_efficientnet_lite0": SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors",
}
CLASSES = ["ants", "bees"]


def classes(root: Path = HYMENOPTERA) -> list[str]:
    return sorted(path.name for path in (root / "train").iterdir() if path.is_dir())


def samples(split: str, root: Path = HYMENOPTERA) -> list[tuple[Path, int]]:
    names = classes(root)
    return [(p, label) for label, name in enumerate(names) for p in sorted((root / split / name).iterdir())]


class Folder(torch.utils.data.Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def pretrained(arch: str, num_classes: int = 2) -> torch.nn.Module:
    model = timm.create_model(arch, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": str(WEIGHTS[arch])})
    if num_classes:  # the tutorial's new head: `nn.Linear(num_ftrs, 2)`, i.e. PyTorch's default Linear init
        model.get_classifier().reset_parameters()
    return model


def evaluate(model, loader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for images, labels in loader:
            right += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return right / total


def frozen_tutorial(arch: str = "mobilenetv2_100", epochs: int = 5, workers: int = 2, root: Path = HYMENOPTERA) -> dict:
    """The tutorial's "ConvNet as fixed feature extractor": backbone frozen, head trained with
    augmentation for `epochs`, SGD(lr=0.001, momentum=0.9), StepLR(7, 0.1), batch size 4."""
    return _tutorial(arch, epochs, workers, root, frozen=True)


def finetune_tutorial(arch: str = "mobilenetv2_100", epochs: int = 5, workers: int = 2, root: Path = HYMENOPTERA) -> dict:
    """The tutorial's "Finetuning the ConvNet": every layer trains, same optimizer and schedule
    (the tutorial runs 25 epochs; `epochs` shortens it for a 2-core machine)."""
    return _tutorial(arch, epochs, workers, root, frozen=False)


def _tutorial(arch: str, epochs: int, workers: int, root: Path, frozen: bool) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    model = pretrained(arch, len(classes(root)))
    head = model.get_classifier()
    for parameter in model.parameters():
        parameter.requires_grad = not frozen
    for parameter in head.parameters():
        parameter.requires_grad = True
    config = resolve_model_data_config(model)
    train = torch.utils.data.DataLoader(Folder(samples("train", root), create_transform(**config, is_training=True)),
                                        batch_size=4, shuffle=True, num_workers=workers)  # fmt: skip
    val = torch.utils.data.DataLoader(Folder(samples("val", root), create_transform(**config)), batch_size=4,
                                      num_workers=workers)  # fmt: skip
    optimizer = torch.optim.SGD((head if frozen else model).parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best = 0.0
    for _ in range(epochs):
        model.train()
        for images, labels in train:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        scheduler.step()
        best = max(best, evaluate(model, val))  # the tutorial keeps the best epoch on val, as here
    return {"seconds": time.perf_counter() - started, "val_accuracy": best, "epochs": epochs}


def logistic_probe(arch: str = "mobilenetv2_100", workers: int = 2, root: Path = HYMENOPTERA) -> dict:
    """timm's pooled features (eval transform) and scikit-learn's LogisticRegression with its defaults."""
    from sklearn.linear_model import LogisticRegression

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    model = pretrained(arch, 0).eval()  # num_classes=0: the model returns pooled features
    transform = create_transform(**resolve_model_data_config(model))

    def features(split):
        loader = torch.utils.data.DataLoader(Folder(samples(split, root), transform), batch_size=32, num_workers=workers)
        with torch.inference_mode():
            pairs = [(model(images), labels) for images, labels in loader]
        return torch.cat([x for x, _ in pairs]).numpy(), torch.cat([y for _, y in pairs]).numpy()

    (train_x, train_y), (val_x, val_y) = features("train"), features("val")
    classifier = LogisticRegression(max_iter=2000).fit(train_x, train_y)
    return {"seconds": time.perf_counter() - started, "val_accuracy": classifier.score(val_x, val_y), "epochs": None}


def full_loop_throughput(arch: str, batch_size: int, epochs: int, workers: int, device: str = "cpu", repeat: int = 1) -> float:
    """Images/s of a plain fp32 full fine-tuning loop (training steps only, data loading included)."""
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = pretrained(arch).to(device)
    config = resolve_model_data_config(model)
    loader = torch.utils.data.DataLoader(Folder(samples("train") * repeat, create_transform(**config, is_training=True)),
                                         batch_size=batch_size, shuffle=True, num_workers=workers)  # fmt: skip
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=2e-4, weight_decay=0.01)
    rates = []
    for _ in range(epochs):
        model.train()
        started, seen = time.perf_counter(), 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1).backward()
            optimizer.step()
            seen += len(labels)
        if device != "cpu":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - started))
    return rates[-1]  # the last epoch: warm caches and allocator, like the engine's figure
