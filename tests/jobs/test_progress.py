"""What a training worker reports within a phase: steps, measured images/s and the time left,
from the batches it has timed. The clock is a fake one here (the batches are made up: no
training runs), so the figures are exact; tests/e2e read them from a real worker."""

import pytest

from app.jobs import runner
from app.ml.spec import Hyperparameters, resolve


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reporter(monkeypatch, tmp_path):
    clock = Clock()
    monkeypatch.setattr(runner.time, "monotonic", clock)
    reporter = runner._DatabaseReporter("job", "me", tmp_path, upload_seconds=1e9, epochs_done=0)
    reporter.written = []
    monkeypatch.setattr(reporter, "_beat", lambda values, event=None: reporter.written.append(values))
    reporter.clock = clock
    return reporter


def run_pass(reporter, phase: str, steps: int, seconds_per_step: float, images: int = 32) -> None:
    for done in range(1, steps + 1):
        reporter.clock.now += seconds_per_step
        reporter.step(phase, done, steps, images)


def test_a_probe_reports_its_feature_passes_with_speed_and_time_left(reporter):
    reporter.plan("linear_probe", resolve(Hyperparameters(), "linear_probe"))
    reporter.step("features", 1, 10, 32)  # the first batch: nothing timed yet
    assert reporter.written[-1]["progress"] == {"phase": "features", "step": 1, "steps": 10,
                                                "images_per_second": None, "eta_seconds": None}  # fmt: skip
    for done in range(2, 10):
        reporter.clock.now += 0.25  # 0.25 s a batch of 32 images: 128 images/s
        reporter.step("features", done, 10, 32)
    # Written at most once a second of progress: the first batch, then at 1 s and 2 s (steps 5 and 9).
    assert [w["progress"]["step"] for w in reporter.written] == [1, 5, 9]
    progress = reporter.written[-1]["progress"]
    assert progress["images_per_second"] == 128.0
    # 1 batch left of this pass, then the validation images' pass (estimated at this pass's size).
    assert progress["eta_seconds"] == pytest.approx((1 + 10) * 0.25, abs=0.05)  # rounded to 0.1 s
    reporter.clock.now += 0.25
    reporter.step("features", 10, 10, 32)  # the end of a pass is always written
    assert reporter.written[-1]["progress"]["step"] == 10 and reporter.written[-1]["progress"]["eta_seconds"] == 2.5


def test_training_estimates_from_its_steps_then_from_timed_epochs(reporter):
    hp = resolve(Hyperparameters(), "full")  # 6 epochs
    reporter.plan("full", hp)
    run_pass(reporter, "training", 10, 3.0)
    # The first epoch: the rest of none of this pass, then 5 more epochs of 10 steps (validation not timed yet).
    assert reporter.written[-1]["progress"]["eta_seconds"] == 5 * 10 * 3.0
    assert reporter.written[-1]["progress"]["images_per_second"] == round(32 / 3.0, 1)
    run_pass(reporter, "validation", 5, 1.0)
    reporter.epoch_end({"epoch": 1, "epochs": 6, "train_loss": 1.0, "val_accuracy": 0.5, "val_accuracy_ci95": [0.4, 0.6],
                        "images_per_second": 10.0})  # fmt: skip
    # Timed epochs from now on: 5 left at 35 s each, less what the current one has run.
    run_pass(reporter, "training", 2, 3.0)
    assert reporter.written[-1]["progress"]["eta_seconds"] == 5 * 35.0 - 6.0


def test_lp_ft_knows_no_end_while_its_network_epochs_are_unmeasured(reporter):
    reporter.plan("lp_ft", resolve(Hyperparameters(), "lp_ft"))
    run_pass(reporter, "features", 4, 1.0)
    assert reporter.written[-1]["progress"]["images_per_second"] == 32.0
    assert reporter.written[-1]["progress"]["eta_seconds"] is None
