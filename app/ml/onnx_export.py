"""Exporting a trained artifact to ONNX, with normalisation and calibration inside the graph.

The graph takes `pixels`, a float32 (N, 3, H, W) batch in [0, 1] (the image after the eval
resize/crop and ToTensor, before normalisation), and returns `probabilities` (N, num_classes) =
softmax(model((pixels - mean) / std) / temperature): the same numbers the prediction endpoint
serves. The label names and the resize/crop settings a client needs travel in the model's
metadata_props as JSON strings. An export is only kept if onnxruntime reproduces the PyTorch
probabilities on real images (parity); otherwise the file is removed and the report says why.

Pure ML: no HTTP, no database.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from timm.data import resolve_model_data_config

from app.ml.backbone import CalibratedClassifier, load_artifact, pixel_transform, preprocessing_of
from app.ml.data import load_rgb
from app.ml.export import read_temperature

INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
PARITY_BATCH_SIZE = 16


@dataclass
class ParityReport:
    images: int
    max_abs_prob_diff: float
    top1_agreement: float  # fraction 0..1 of images whose top-1 class is the same in both
    passed: bool
    opset: int

    def as_dict(self) -> dict:
        return asdict(self)


def export_onnx(
    artifact_dir: Path,
    out_path: Path,
    parity_images: list[Path],
    *,
    tolerance: float = 1e-4,
    opset: int = 18,
) -> ParityReport:
    """Write `out_path` (.onnx) from the artifact in `artifact_dir` and check it against PyTorch.

    `passed` needs every parity image to keep its top-1 class and every probability to be within
    `tolerance`. When it fails, `out_path` is deleted and the report is still returned.
    """
    if not parity_images:
        raise ValueError("export_onnx needs at least one parity image: an unchecked export is not kept")
    artifact_dir, out_path = Path(artifact_dir), Path(out_path)
    model = load_artifact(artifact_dir).eval().to(device="cpu", dtype=torch.float32)
    data_config = resolve_model_data_config(model)
    temperature = read_temperature(artifact_dir)
    wrapper = CalibratedClassifier(model, temperature).eval()
    metadata = {
        "label_names": json.dumps(list(model.pretrained_cfg["label_names"])),
        "preprocessing": json.dumps(preprocessing_of(model)),
        "temperature": json.dumps(temperature),
        "architecture": json.dumps(model.pretrained_cfg.get("architecture")),
    }
    try:
        _export(wrapper, tuple(data_config["input_size"]), out_path, opset, metadata)
        exported_opset = _check(out_path)
        report = _parity(wrapper, out_path, parity_images, tolerance, exported_opset)
    except BaseException:
        _remove(out_path)
        raise
    if not report.passed:
        _remove(out_path)
    return report


def _export(
    wrapper: torch.nn.Module, input_size: tuple[int, ...], out_path: Path, opset: int, metadata: dict[str, str]
) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, *input_size)  # batch 2, not 1: torch.export specialises size-1 dims
    # Exporter choice: the torch.export-based exporter (dynamo=True) is torch's default and
    # maintained path since 2.9; the TorchScript one (dynamo=False) is deprecated ("will be
    # removed") and warns on every call. dynamo costs onnxscript (+ onnx-ir, pure Python) and a
    # slower export (about 9 s against 1.3 s for mobilenetv2 on 2 CPU cores), acceptable for a
    # one-off job; both gave the same parity (~1e-6).
    program = torch.onnx.export(
        wrapper,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1)}},
        opset_version=opset,
        optimize=True,
        verbose=False,  # no progress lines on stdout in a worker; failures still raise with details
    )
    program.model.doc_string = (
        f"Input '{INPUT_NAME}': float32 RGB (N, 3, H, W) in [0, 1], resized and cropped as metadata "
        f"'preprocessing' says, NOT normalised (mean/std are applied inside the graph). Output "
        f"'{OUTPUT_NAME}': calibrated softmax (N, num_classes), columns in the order of 'label_names'."
    )
    program.model.metadata_props.update(metadata)
    # One self-contained file; torch moves the weights to '<name>.data' beside it only for models
    # too large for a single protobuf.
    program.save(out_path, external_data=False)


def _check(out_path: Path) -> int:
    """onnx's checker (by path, so models with external data work too); returns the default-domain opset."""
    onnx.checker.check_model(str(out_path), full_check=True)
    model_proto = onnx.load(str(out_path), load_external_data=False)
    return next(entry.version for entry in model_proto.opset_import if entry.domain in ("", "ai.onnx"))


def _parity(
    wrapper: CalibratedClassifier, out_path: Path, parity_images: list[Path], tolerance: float, opset: int
) -> ParityReport:
    transform = pixel_transform(wrapper.model)
    session = onnxruntime.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])

    batch_diffs, agreeing = [], 0
    for start in range(0, len(parity_images), PARITY_BATCH_SIZE):
        pixels = torch.stack([transform(load_rgb(path)) for path in parity_images[start : start + PARITY_BATCH_SIZE]])
        with torch.inference_mode():
            reference = wrapper(pixels).numpy()  # what app.serving.predictor's PyTorch runtime computes
        (exported,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})
        batch_diffs.append(np.abs(exported.astype(np.float64) - reference).max())
        agreeing += int((exported.argmax(axis=1) == reference.argmax(axis=1)).sum())

    top1_agreement = agreeing / len(parity_images)
    max_diff = float(np.max(batch_diffs))  # np.max keeps a NaN, which then fails the <= below
    return ParityReport(
        images=len(parity_images),
        max_abs_prob_diff=max_diff,
        top1_agreement=top1_agreement,
        passed=top1_agreement == 1.0 and max_diff <= tolerance,
        opset=opset,
    )


def _remove(out_path: Path) -> None:
    out_path.unlink(missing_ok=True)
    out_path.with_name(out_path.name + ".data").unlink(missing_ok=True)  # external weights, if any
