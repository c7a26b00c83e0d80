"""ONNX export of a real artifact (mobilenetv2 on the real ImageNet weights), checked on real images."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torchvision import transforms

from app.ml.backbone import build_model
from app.ml.export import save_artifact
from app.ml.onnx_export import export_onnx
from tests.conftest import HYMENOPTERA, MOBILENET_WEIGHTS

LABELS = ["ants", "bees"]
PARITY_IMAGES = [
    path
    for label in LABELS
    for path in sorted((HYMENOPTERA / "val" / label).iterdir())[:6]
]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS)
    torch.manual_seed(0)
    # build_model zero-starts the classifier; random weights make the two classes' scores vary.
    torch.nn.init.normal_(model.get_classifier().weight, std=0.05)
    torch.nn.init.normal_(model.get_classifier().bias, std=0.5)
    directory = tmp_path_factory.mktemp("onnx") / "artifact"
    save_artifact(model, directory, LABELS, {}, temperature=0.7)
    return directory


@pytest.fixture(scope="module")
def exported(artifact):
    out_path = artifact.parent / "exported" / "model.onnx"
    return export_onnx(artifact, out_path, PARITY_IMAGES), out_path


def test_export_matches_pytorch_on_real_images(exported):
    report, out_path = exported
    assert len(PARITY_IMAGES) == 12
    assert report.passed, report.as_dict()
    assert report.images == 12
    assert report.top1_agreement == 1.0
    assert 0.0 <= report.max_abs_prob_diff <= 1e-4
    assert report.opset == 18
    assert set(report.as_dict()) == {"images", "max_abs_prob_diff", "top1_agreement", "passed", "opset"}
    assert out_path.is_file()


def test_onnx_probabilities_equal_an_independent_pytorch_computation(artifact, exported):
    """The report's parity figure comes from the exporter's own comparison; check it from outside:
    timm loads the artifact as any user would, the softmax of logits / temperature is computed here,
    and onnxruntime runs the exported file on the same [0, 1] pixels."""
    report, out_path = exported
    model = timm.create_model(f"local-dir:{artifact}", pretrained=True).eval()
    steps = create_transform(**resolve_model_data_config(model), is_training=False).transforms
    normalize = steps[-1]
    assert isinstance(normalize, transforms.Normalize)
    to_pixels = transforms.Compose(steps[:-1])  # resize, crop, to [0, 1]: the graph's input
    pixels = torch.stack([to_pixels(Image.open(path).convert("RGB")) for path in PARITY_IMAGES])
    with torch.inference_mode():
        expected = torch.softmax(model(normalize(pixels)) / 0.7, dim=1).numpy()  # save_artifact's temperature

    session = onnxruntime.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"pixels": pixels.numpy()})

    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-4)
    assert (probabilities.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert np.abs(probabilities - expected).max() <= report.max_abs_prob_diff + 1e-5  # the report did not understate it
    assert len(set(expected.argmax(axis=1))) == 2  # the random head gives both classes: argmax agreement means something


def test_exported_model_carries_labels_and_preprocessing(exported):
    _, out_path = exported
    model = onnx.load(str(out_path))
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert json.loads(metadata["label_names"]) == LABELS
    preprocessing = json.loads(metadata["preprocessing"])
    assert preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert preprocessing["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert preprocessing["input_size"] == [3, 224, 224]
    assert {"interpolation", "crop_pct", "crop_mode"} <= preprocessing.keys()
    assert json.loads(metadata["temperature"]) == pytest.approx(0.7)


def test_exported_model_has_a_dynamic_batch_and_returns_probabilities(exported):
    _, out_path = exported
    session = onnxruntime.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "pixels"
    assert graph_input.shape[1:] == [3, 224, 224] and not isinstance(graph_input.shape[0], int)
    rng = np.random.default_rng(0)
    outputs = {}
    for batch in (1, 5):
        pixels = rng.random((batch, 3, 224, 224), dtype=np.float32)
        (probabilities,) = session.run(["probabilities"], {"pixels": pixels})
        assert probabilities.shape == (batch, 2)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert ((probabilities >= 0) & (probabilities <= 1)).all()
        outputs[batch] = probabilities
    assert not np.allclose(outputs[5], outputs[5][:1])  # the classifier is not constant


def test_failed_parity_removes_the_file_and_still_reports(artifact):
    out_path = artifact.parent / "refused" / "model.onnx"
    # No absolute difference is <= -1: this fails on any runtime, even a bit-exact one.
    report = export_onnx(artifact, out_path, PARITY_IMAGES[:2], tolerance=-1.0)
    assert not report.passed
    assert report.images == 2 and report.top1_agreement == 1.0 and report.max_abs_prob_diff <= 1e-4
    assert not out_path.exists()
    assert not any(out_path.parent.iterdir())


def test_export_without_parity_images_is_refused(artifact, tmp_path):
    with pytest.raises(ValueError, match="parity image"):
        export_onnx(artifact, tmp_path / "model.onnx", [])
    assert not (tmp_path / "model.onnx").exists()
