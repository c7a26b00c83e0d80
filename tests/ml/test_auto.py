"""`strategy: "auto"` (app/ml/auto.py) on the real pretrained weights and a real subset of hymenoptera."""

import time

import torch

from app.ml import auto
from app.ml.backbone import build_model
from app.ml.spec import Hyperparameters
from tests.conftest import EFFICIENTNET_WEIGHTS, MOBILENET_WEIGHTS
from tests.ml.test_train import CLASSES, subset

TRAIN = subset("train", 24)  # 24 per class: enough for the fine-tuning candidates to be considered
BACKBONES = {"mobilenetv2_100": MOBILENET_WEIGHTS, "tf_efficientnet_lite0": EFFICIENTNET_WEIGHTS}


def backbones(*names: str) -> list[auto.Backbone]:
    def builder(name):
        return lambda: build_model(name, len(CLASSES), weights_file=BACKBONES[name])

    return [auto.Backbone(name, builder(name), sum(p.numel() for p in builder(name)().parameters())) for name in names]


def search(tmp_path, names, budget_seconds, samples=TRAIN, serve_probe=None, **hp):
    noted = []
    choice = auto.search(backbones(*names), samples, CLASSES, Hyperparameters(**hp), 0, budget_seconds, tmp_path / "auto",
                         lambda: None, noted.append, torch.device("cpu"), serve_probe=serve_probe)  # fmt: skip
    return choice, noted


def test_auto_measures_every_candidate_by_cross_validation_within_its_budget(tmp_path):
    choice, noted = search(tmp_path, ["mobilenetv2_100", "tf_efficientnet_lite0"], 3600, epochs=1)
    record = choice.record
    tried = [(t["backbone"], t["strategy"]) for t in record["trials"]]
    best_probe = max(record["trials"][:2], key=lambda t: (t["cv_accuracy"], t["cv_macro_f1"]))["backbone"]
    assert tried[:2] == [("mobilenetv2_100", "linear_probe"), ("tf_efficientnet_lite0", "linear_probe")]
    assert sorted(tried[2:]) == [(best_probe, "lp_ft"), (best_probe, "partial")]  # on the best-ranked backbone
    assert [(t.backbone, t.strategy) for t in noted] == tried  # the job is told of each as it finishes
    for trial in noted:
        assert trial.skipped is None and trial.seconds > 0
        assert 0.5 < trial.cv_accuracy <= 1 and trial.cv_accuracy_ci95[0] < trial.cv_accuracy < trial.cv_accuracy_ci95[1]
        assert len(trial.correct) == len(TRAIN)  # every training image predicted once, by a model that did not train on it
        assert trial.cv_accuracy == trial.correct.sum().item() / len(TRAIN)
    assert all(t["estimated_seconds"] > 0 for t in record["trials"][1:])
    assert record["folds"] == 3 and record["train_images"] == len(TRAIN)
    assert set(record["learning_curve"]) == {"half_data", "all_data"}
    assert record["learning_curve"]["all_data"] == record["trials"][0]["cv_accuracy"]

    # The winner is the best among the candidates that beat the requested probe beyond noise, or the probe.
    baseline = noted[0]
    beating = [t for t in noted[1:] if _margin(t, baseline) > 0]
    assert (choice.backbone, choice.strategy) == (record["winner"]["backbone"], record["winner"]["strategy"])
    if beating:
        best = max(beating, key=lambda t: (t.cv_accuracy, t.cv_macro_f1))
        assert (choice.backbone, choice.strategy) == (best.backbone, best.strategy)
        assert "standard errors, more than noise" in choice.reason
    else:
        assert (choice.backbone, choice.strategy) == ("mobilenetv2_100", "linear_probe")
        assert "no candidate beat" in choice.reason
    assert (choice.features is not None) == (choice.strategy == "linear_probe")
    assert not (tmp_path / "auto").exists()  # the folds' files are gone


def test_the_measured_probe_is_handed_over_to_be_served_off_the_budget(tmp_path):
    """The job trains and serves the requested probe from these features while the search goes on."""
    handed, samples = [], subset("train", 8)

    def serve_probe(features):
        handed.append((len(noted_so_far), features))
        time.sleep(2)  # as training and registering the probe take a while

    started = time.perf_counter()
    noted_so_far: list = []
    choice = auto.search(backbones("mobilenetv2_100"), samples, CLASSES, Hyperparameters(), 0, 3600, tmp_path / "auto",
                         lambda: None, noted_so_far.append, torch.device("cpu"), serve_probe=serve_probe)  # fmt: skip
    wall = time.perf_counter() - started
    assert len(handed) == 1 and handed[0][0] == 0  # once, as soon as its features exist, before it is measured
    assert noted_so_far[0].seconds > 0 and noted_so_far[0].cv_accuracy > 0.5  # then measured all the same
    features = handed[0][1]
    assert features["train_x"].shape[0] == len(samples) and features["train_y"].tolist() == [y for _, y in samples]
    assert (choice.backbone, choice.strategy) == ("mobilenetv2_100", "linear_probe")
    assert torch.equal(choice.features["train_x"], features["train_x"])  # what the job trained is what won
    assert choice.record["seconds"] <= wall - 2  # the time spent serving it is not the search's


def _margin(trial: auto.Trial, baseline: auto.Trial) -> float:
    gained = int((trial.correct & ~baseline.correct).sum())
    lost = int((~trial.correct & baseline.correct).sum())
    return gained - lost - (gained + lost) ** 0.5


def test_a_small_budget_measures_the_probe_and_skips_what_would_overrun(tmp_path):
    choice, noted = search(tmp_path, ["mobilenetv2_100", "tf_efficientnet_lite0"], 0.5)
    assert noted[0].strategy == "linear_probe" and noted[0].cv_accuracy > 0.5  # always measured
    assert [t.skipped is not None for t in noted] == [False, True, True, True]
    assert all("of the budget left" in t.skipped for t in noted[1:])
    assert (choice.backbone, choice.strategy) == ("mobilenetv2_100", "linear_probe")
    # The probe's training-split features, for the job's final training to read back.
    assert choice.features["train_x"].shape == (len(TRAIN), 1280) and choice.features["train_y"].tolist() == [
        label for _, label in TRAIN
    ]


def test_a_candidate_that_overruns_its_estimate_is_stopped_when_the_budget_runs_out(tmp_path, monkeypatch):
    """Estimates are estimates: one that was far too low (made so here) does not let a candidate run
    past the budget. The budget is set from the probe's own measured time, so the test holds on a
    fast machine and a slow one alike."""
    probe_only, _ = search(tmp_path, ["mobilenetv2_100"], 0.001, epochs=10)
    probe_seconds = probe_only.record["trials"][0]["seconds"]
    monkeypatch.setattr(auto._Search, "estimate", lambda self, backbone, strategy: 0.001)
    choice, noted = search(tmp_path, ["mobilenetv2_100"], probe_seconds * 2.5, epochs=10)  # partial takes far longer
    assert [t.strategy for t in noted] == ["linear_probe", "partial", "lp_ft"]
    stopped = [t for t in noted[1:] if t.skipped and t.skipped.startswith("stopped after")]
    assert stopped and all(t.cv_accuracy is None and t.seconds > 0 for t in stopped), [t.record() for t in noted]
    assert (choice.backbone, choice.strategy) == ("mobilenetv2_100", "linear_probe")
    assert not (tmp_path / "auto").exists()  # the stopped fold's files are gone too


def test_too_little_data_to_measure_keeps_the_probe_and_says_why(tmp_path):
    choice, noted = search(tmp_path, ["mobilenetv2_100"], 60, samples=subset("train", 1))
    assert (choice.strategy, noted) == ("linear_probe", []) and "too few to cross-validate" in choice.reason
    choice, _ = search(tmp_path, ["mobilenetv2_100"], 0)
    assert choice.strategy == "linear_probe" and "budget_seconds is 0" in choice.reason
    # 8 per class: the probe is measured, fine-tuning is not considered at this size
    choice, noted = search(tmp_path, ["mobilenetv2_100"], 3600, samples=subset("train", 8))
    assert [t.strategy for t in noted] == ["linear_probe", "partial", "lp_ft"]
    assert all("smallest class has 8 training images" in t.skipped for t in noted[1:])


def test_a_candidate_wins_only_beyond_noise():
    """The decision rule alone, on made-up per-image outcomes (it is arithmetic, not learning):
    100 training images, the probe right on the first 80."""
    baseline = auto.Trial("a", "linear_probe", cv_accuracy=0.80, cv_macro_f1=0.8, correct=torch.arange(100) < 80)

    def candidate(strategy, gained, lost):
        correct = baseline.correct.clone()
        correct[80 : 80 + gained] = True
        correct[:lost] = False
        accuracy = correct.float().mean().item()
        return auto.Trial("a", strategy, cv_accuracy=accuracy, cv_macro_f1=accuracy, correct=correct)

    close = candidate("partial", gained=3, lost=1)  # +2 of 4 disagreements: 1.0 standard error, noise
    winner, reason = auto._pick(baseline, [baseline, close])
    assert winner is baseline and "no candidate beat" in reason
    clear = candidate("lp_ft", gained=6, lost=1)  # +5 of 7: 1.9 standard errors
    winner, reason = auto._pick(baseline, [baseline, close, clear])
    assert winner is clear and "right on 6 that the probe got wrong, wrong on 1" in reason
