"""The pure ML core, on the real pretrained weights and small real subsets of hymenoptera."""

import math

import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from app.ml.backbone import build_model
from app.ml.calibration import expected_calibration_error, fit_temperature
from app.ml.data import class_weights, list_samples, stratified_split
from app.ml.metrics import classification_metrics, wilson_interval
from app.ml.spec import Hyperparameters, resolve, resolve_for_device
from app.ml import train as train_module
from app.ml.tensor_augment import DeviceImages
from app.ml.train import CHECKPOINT_NAME, fine_tune, trainable_parameter_names
from tests.conftest import HYMENOPTERA, MOBILENET_WEIGHTS

CLASSES = ["ants", "bees"]


def subset(split: str, per_class: int) -> list:
    samples = list_samples(HYMENOPTERA / split, CLASSES)
    return [s for s in samples if s[1] == 0][:per_class] + [s for s in samples if s[1] == 1][:per_class]


TRAIN, VAL = subset("train", 16), subset("val", 12)
HELD_OUT = [s for s in subset("val", 40) if s not in VAL]  # 28 per class, seen by neither training nor model selection
ZERO_HEAD_LOSS = math.log(2)  # build_model zero-starts the head: uniform probabilities on any image


def held_out_scores(model: torch.nn.Module) -> tuple[float, float]:
    """Accuracy and ROC AUC of the bees-minus-ants logit on HELD_OUT, computed here with timm's own
    eval transform (not app.ml's metrics). The zero-started head scores 0.5 on both: one class for
    every image, and every margin tied at zero."""
    transform = create_transform(**resolve_model_data_config(model))
    with torch.inference_mode():
        logits = model.eval()(torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in HELD_OUT]))
    labels = torch.tensor([label for _, label in HELD_OUT])
    margin = logits[:, 1] - logits[:, 0]
    bees, ants = margin[labels == 1][:, None], margin[labels == 0][None, :]
    auc = ((bees > ants).float().mean() + 0.5 * (bees == ants).float().mean()).item()
    return (logits.argmax(1) == labels).float().mean().item(), auc


class Recorder:
    def __init__(self, stop_after: int | None = None):
        self.records, self.stop_after = [], stop_after

    def check(self):
        pass

    def step(self, phase, done, total, images):
        pass

    def epoch_end(self, record):
        self.records.append(record)
        if self.stop_after is not None and len(self.records) >= self.stop_after:
            raise KeyboardInterrupt("simulated crash after a checkpoint")


def hyperparameters(strategy: str, **values) -> Hyperparameters:
    return resolve_for_device(resolve(Hyperparameters(**values), strategy), "cpu")


def train(tmp_path, strategy: str, reporter=None, train=TRAIN, augment_on_device=True, **values):
    model = build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS)
    reporter = reporter or Recorder()
    result = fine_tune(model, train, VAL, CLASSES, strategy, hyperparameters(strategy, **values), 0, tmp_path,
                       reporter, torch.device("cpu"), augment_on_device=augment_on_device)  # fmt: skip
    return result, reporter


@pytest.fixture
def device_batches(monkeypatch) -> list:
    """The training batches augmented on the device (app/ml/tensor_augment.py), as they are drawn."""
    drawn = []
    batches = DeviceImages.batches

    def recorded(self, order):
        for batch in batches(self, order):
            drawn.append(batch)
            yield batch

    monkeypatch.setattr(DeviceImages, "batches", recorded)
    return drawn


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
    assert "val_top5_accuracy" not in metrics


def test_accuracy_comes_with_its_wilson_interval():
    # The textbook value: 0 of 10 gives [0, 0.2775], where the normal approximation gives [0, 0].
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    low, high = wilson_interval(147, 153)
    assert low < 147 / 153 < high and high - low < wilson_interval(14, 15)[1] - wilson_interval(14, 15)[0]
    metrics = classification_metrics(torch.tensor([[2.0, 0.0]] * 4), torch.tensor([0, 0, 0, 1]), CLASSES)
    assert metrics["val_accuracy"] == 0.75 and metrics["val_images"] == 4
    assert metrics["val_accuracy_ci95"] == pytest.approx(wilson_interval(3, 4))


def test_top5_reported_beyond_five_classes():
    logits = torch.eye(7)[[1, 2, 3]] * 5
    metrics = classification_metrics(logits, torch.tensor([1, 2, 0]), [str(i) for i in range(7)])
    assert metrics["val_top5_accuracy"] == 1.0 and metrics["val_accuracy"] == pytest.approx(2 / 3)


def test_class_weights_are_inverse_frequency():
    imbalanced = subset("train", 30)[:30] + subset("train", 10)[10:]  # 30 ants, 10 bees
    assert [label for _, label in imbalanced].count(0) == 30
    weights = class_weights(imbalanced, 2)
    assert weights.tolist() == pytest.approx([40 / (2 * 30), 40 / (2 * 10)])
    assert (weights[0] * 30).item() == pytest.approx((weights[1] * 10).item())  # each class weighs the same in total


def test_temperature_scaling_calibrates_overconfident_logits():
    torch.manual_seed(0)
    targets = torch.randint(0, 2, (400,))
    correct = torch.rand(400) < 0.7  # 70% right, but claimed with ~100% confidence
    predicted = torch.where(correct, targets, 1 - targets)
    logits = torch.nn.functional.one_hot(predicted, 2).float() * 10
    temperature = fit_temperature(logits, targets)
    assert temperature > 5
    assert expected_calibration_error(logits / temperature, targets) < expected_calibration_error(logits, targets) / 3


@pytest.mark.parametrize(
    "strategy, values",
    [
        ("linear_probe", {}),
        # 3 epochs: after 2 (8 steps), validation accuracy ranged from 0.67 to 0.96 over seeds, augmented
        # by loader processes or on the device alike; after 3, from 0.83 to 0.96.
        ("partial", {"epochs": 3}),
        ("full", {"epochs": 3}),
        ("lp_ft", {"epochs": 1, "lp_epochs": 10}),
    ],
)
def test_each_strategy_learns_well_above_chance(tmp_path, strategy, values):
    before = build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS).state_dict()
    result, recorder = train(tmp_path, strategy, **values)
    assert result.metrics["val_accuracy"] >= 0.8  # chance is 0.5
    accuracy, auc = held_out_scores(result.model)  # and on images neither training nor model selection saw
    assert accuracy >= 0.75 and auc >= 0.85
    assert [r["epoch"] for r in recorder.records] == list(range(1, len(recorder.records) + 1))
    calibration = result.metrics["calibration"]
    assert calibration["temperature"] > 0 and 0 <= calibration["ece_after"] <= 1

    after = result.model.state_dict()
    classifier = {"classifier.weight", "classifier.bias"}
    changed = {k for k, v in after.items() if v.dtype.is_floating_point and not torch.equal(v, before[k])}
    if strategy == "linear_probe":
        assert changed == classifier  # the backbone is bitwise unchanged
    elif strategy == "partial":
        trainable = trainable_parameter_names(result.model, 2)
        frozen_params = {k for k in before if k.endswith(("weight", "bias")) and k not in trainable}
        assert changed & frozen_params == set()
        assert "blocks.0.0.conv_dw.weight" in frozen_params and "blocks.6.0.conv_pw.weight" in trainable
        assert "blocks.6.0.conv_pw.weight" in changed and "bn2.running_mean" in changed  # the last stage trained
        assert "bn1.running_mean" not in changed  # frozen batch-norm statistics stay pretrained
    elif strategy == "full":
        assert "conv_stem.weight" in changed  # every layer trains
    else:  # the kept epoch may come from either phase; both must have run
        assert [r["stage"] for r in recorder.records] == ["linear_probe"] * 10 + ["lp_ft"]


@pytest.mark.parametrize("augment_on_device", [False, True])
def test_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, augment_on_device, device_batches):
    values = {"epochs": 3, "batch_size": 8, "workers": 0, "augment_on_device": augment_on_device}
    straight, straight_log = train(tmp_path / "straight", "full", **values)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", "full", reporter=Recorder(stop_after=2), **values)
    resumed, resumed_log = train(tmp_path / "resumed", "full", **values)
    assert [r["epoch"] for r in resumed_log.records] == [3]  # only the missing epoch ran
    assert resumed_log.records[0]["train_loss"] == pytest.approx(straight_log.records[2]["train_loss"], rel=1e-4)
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert len(device_batches) == (6 * 4 if augment_on_device else 0)  # 6 epochs in all, of 32 images in 4 batches


def test_a_resumed_fp16_run_keeps_its_loss_scale(tmp_path, monkeypatch):
    """fp16 training scales its loss, and the scale moves during the run (halved at each overflow);
    a resumed run must go on with the scale the checkpoint was written with. fp16 needs a GPU
    without bf16; there is none here, so this CPU run is told to use fp16 (PyTorch's CPU autocast
    and GradScaler run it)."""
    monkeypatch.setattr(train_module, "amp_dtype_for", lambda device: torch.float16)
    # One step per epoch (8 images): fp16 on a CPU is slow, and the scale's carry-over is the point.
    values = {"epochs": 2, "batch_size": 8, "workers": 0, "amp": True, "train": subset("train", 4)}
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "full", reporter=Recorder(stop_after=1), **values)
    checkpoint = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert checkpoint["scaler"]["scale"] > 0  # the scale the first epoch ended with
    checkpoint["scaler"]["scale"] = 256.0  # as if the first epoch had overflowed eight times
    torch.save(checkpoint, tmp_path / CHECKPOINT_NAME)
    train(tmp_path, "full", **values)
    # The second epoch started from 256 (a scale only doubles after 2000 clean steps, not in 4).
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["scaler"]["scale"] <= 256.0


def test_early_stopping_stops(tmp_path):
    # No epoch can improve accuracy by more than 1.0, so the run stops after `patience` epochs.
    stop = {"metric": "val_accuracy", "patience": 2, "min_delta": 1.0}
    result, recorder = train(tmp_path, "linear_probe", epochs=30, early_stopping=stop)
    assert result.stopped_early and len(recorder.records) == 3
    assert recorder.records[-1]["eta_seconds"] == 0


@pytest.mark.parametrize(
    "mixing, augment_on_device",
    [({}, False), ({"mixup": 0.2, "cutmix": 1.0}, False), ({}, True)],
    ids=["loader-processes", "loader-processes-mixup", "on-device"],
)
def test_full_fine_tune_with_and_without_mixup_learns(tmp_path, mixing, augment_on_device, device_batches):
    # lr 1e-3: the recipe's 2e-4 barely moves a full fine-tune in the 8 steps this test can afford.
    result, recorder = train(tmp_path, "full", epochs=2, batch_size=8, lr=1e-3, augment_on_device=augment_on_device,
                             **mixing)  # fmt: skip
    assert len(device_batches) == (2 * 4 if augment_on_device else 0)
    losses = [record["val_loss"] for record in recorder.records]
    assert len(losses) == 2 and all(math.isfinite(record["train_loss"]) for record in recorder.records)
    assert min(losses) < ZERO_HEAD_LOSS - 0.05  # better than where it started, on images it did not train on
    _, auc = held_out_scores(result.model)
    assert auc >= 0.75  # and it ranks unseen bees above unseen ants (chance: 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_training_images_are_augmented_there(tmp_path, device_batches):
    hp = resolve_for_device(resolve(Hyperparameters(epochs=2, batch_size=8), "full"), "cuda")
    model = build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS)
    result = fine_tune(model, TRAIN, VAL, CLASSES, "full", hp, 0, tmp_path, Recorder(), torch.device("cuda"))
    assert len(device_batches) == 2 * 4 and all(images.device.type == "cuda" for images, _ in device_batches)
    assert result.metrics["val_accuracy"] >= 0.75  # chance is 0.5


def test_ema_class_weighting_and_augmentation_options_run(tmp_path, device_batches):
    imbalanced = subset("train", 16)[:16] + subset("train", 6)[6:]
    result, recorder = train(
        tmp_path, "full", train=imbalanced, epochs=3, batch_size=8, lr=1e-3, model_ema=True, model_ema_decay=0.9,
        class_weighting="auto", aa="rand-m9-mstd0.5", reprob=0.25, layer_decay=0.75, grad_accum_steps=2,
    )  # fmt: skip
    assert all("ema_val_accuracy" in r for r in recorder.records)
    assert device_batches == []  # a RandAugment policy has no tensor form: loader processes augment
    assert result.metrics["weights_from"] in ("model", "ema")
    # With all of these on at once, it still learns: lower held-out loss than the zero-started head,
    # and unseen bees ranked above unseen ants.
    assert min(record["val_loss"] for record in recorder.records) < ZERO_HEAD_LOSS - 0.05
    _, auc = held_out_scores(result.model)
    assert auc >= 0.75


def test_evaluation_of_kept_pixels_on_a_cpu_runs_without_loader_processes(tmp_path):
    """A crop of kept pixels costs less than handing batches over from a loader process; training
    (augmentation) and images decoded on use keep the processes asked for."""
    hp = resolve_for_device(resolve(Hyperparameters(workers=1), "linear_probe"), "cpu")
    model = build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS)
    run = train_module._Run(model, TRAIN, VAL, CLASSES, "linear_probe", hp, 0, tmp_path, Recorder(), torch.device("cpu"), None)
    kept = run.val_images
    assert kept.complete
    assert run._loader(VAL, run.eval_transform, kept, train=False).num_workers == 0
    assert run._loader(TRAIN, run.train_transform, run.train_images, train=True).num_workers == 1
    assert run._loader(VAL, run.eval_transform, None, train=False).num_workers == 1
    kept.pixels[0] = None  # past the cache's byte budget: decoded on use
    assert not kept.complete
    assert run._loader(VAL, run.eval_transform, kept, train=False).num_workers == 1
