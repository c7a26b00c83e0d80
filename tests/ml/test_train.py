"""The pure ML core on real weights and a small real subset of hymenoptera."""

import torch

from app.ml.backbone import build_model
from app.ml.data import list_samples, stratified_split
from app.ml.metrics import classification_metrics
from app.ml.train import TrainSpec, fine_tune
from tests.conftest import HYMENOPTERA, MOBILENET_WEIGHTS

CLASSES = ["ants", "bees"]


class Recorder:
    def __init__(self):
        self.records = []

    def check(self):
        pass

    def epoch_end(self, record):
        self.records.append(record)


def test_stratified_split_holds_out_each_class():
    samples = list_samples(HYMENOPTERA / "train", CLASSES)
    train, val = stratified_split(samples, 0.2, seed=3)
    assert len(train) + len(val) == len(samples) == 245
    assert {label: sum(1 for _, l in val if l == label) for label in (0, 1)} == {0: 25, 1: 24}
    assert set(train).isdisjoint(val)
    assert stratified_split(samples, 0.2, seed=3) == (train, val)


def test_metrics_from_known_predictions():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    targets = torch.tensor([0, 0, 1, 1])
    metrics = classification_metrics(logits, targets, CLASSES)
    assert metrics["val_accuracy"] == 0.75
    assert metrics["confusion_matrix"] == [[2, 0], [1, 1]]
    assert metrics["per_class"][0]["precision"] == 2 / 3 and metrics["per_class"][1]["recall"] == 0.5


def test_linear_probe_trains_only_the_head(tmp_path):
    train = [s for s in list_samples(HYMENOPTERA / "train", CLASSES) if s[1] == 0][:16]
    train += [s for s in list_samples(HYMENOPTERA / "train", CLASSES) if s[1] == 1][:16]
    val = list_samples(HYMENOPTERA / "val", CLASSES)[:10] + list_samples(HYMENOPTERA / "val", CLASSES)[-10:]
    model = build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS)
    backbone_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    spec = TrainSpec("linear_probe", epochs=10, batch_size=16, lr=1e-3, opt="adamw", weight_decay=0.01,
                     sched="cosine", warmup_epochs=0, smoothing=0.1, seed=0)
    recorder = Recorder()
    result = fine_tune(model, train, val, CLASSES, spec, tmp_path, recorder, torch.device("cpu"))
    after = result.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone_before.items())  # bitwise unchanged
    assert after["classifier.weight"].abs().sum() > 0
    assert [r["epoch"] for r in recorder.records] == list(range(1, 11))
    assert recorder.records[-1]["train_loss"] < recorder.records[0]["train_loss"]
    assert result.metrics["val_accuracy"] >= 0.8  # well above chance (0.5) from 32 images
