"""Exporting a trained artifact to ONNX, with normalisation and calibration inside the graph.

The graph takes `pixels`, a float32 (N, 3, H, W) batch in [0, 1] (the image after the eval
resize/crop and ToTensor, before normalisation), and returns `probabilities` (N, num_classes) =
softmax(model((pixels - mean) / std) / temperature): the same numbers the prediction endpoint
serves. The label names and the resize/crop settings a client needs travel in the model's
metadata_props as JSON strings. An export is only kept if onnxruntime reproduces the PyTorch
probabilities on real images (parity); otherwise the file is removed and the report says why.
`export_onnx_int8` quantizes that graph to int8 (onnxruntime's static quantization) under a
looser gate: the same top-1 class on nearly every validation image and no accuracy lost.

Pure ML: no HTTP, no database.
"""

import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from timm.data import resolve_model_data_config

from app.ml.backbone import CalibratedClassifier, load_artifact, pixel_transform, preprocessing_of
from app.ml.data import load_rgb
from app.ml.export import read_temperature

INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
PARITY_BATCH_SIZE = 16
CALIBRATION_IMAGES = 128  # training images that set the int8 activation ranges
MIN_INT8_AGREEMENT = 0.99  # top-1 agreement with the fp32 model on the validation images
MAX_INT8_ACCURACY_DROP = 0.005  # validation accuracy, fp32 minus int8


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

    def build() -> ParityReport:
        _export(wrapper, tuple(data_config["input_size"]), out_path, opset, metadata)
        return _parity(wrapper, out_path, parity_images, tolerance, _check(out_path))

    return _kept_if_passed(out_path, build)


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


@dataclass
class Int8Report:
    images: int
    calibration_images: int
    top1_agreement: float  # with the fp32 PyTorch model, as served
    accuracy_fp32: float
    accuracy_int8: float
    max_abs_prob_diff: float
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def export_onnx_int8(
    artifact_dir: Path, out_path: Path, calibration_images: list[Path], validation: list[tuple[Path, int]], seed: int = 0,
    min_agreement: float = MIN_INT8_AGREEMENT, max_accuracy_drop: float = MAX_INT8_ACCURACY_DROP,
    fp32_onnx: Path | None = None,
) -> Int8Report:
    """Write `out_path`: the model's ONNX graph with int8 weights and activations (onnxruntime's
    static quantization, QDQ format, per-channel weights), its activation ranges calibrated on up to
    CALIBRATION_IMAGES of the model's own training images. Kept only if, on the validation images,
    its top-1 class agrees with the fp32 model's on at least `min_agreement` of them and its
    accuracy is at most `max_accuracy_drop` below; otherwise the file is removed. (MinMax
    calibration: percentile and entropy calibration took 3 to 6 times as long and flipped the same
    borderline images on hymenoptera.) `fp32_onnx`: the model's parity-checked fp32 export, if it
    has one; otherwise one is exported here first.

    The classifier head and what follows it (temperature, softmax) stay in float: quantized logits
    would move the calibrated probabilities by whole percents, for little speed."""
    if not calibration_images or not validation:
        raise ValueError("export_onnx_int8 needs calibration and validation images")
    artifact_dir, out_path = Path(artifact_dir), Path(out_path)
    wrapper = CalibratedClassifier(load_artifact(artifact_dir).eval().float(), read_temperature(artifact_dir)).eval()
    transform = pixel_transform(wrapper.model)
    chosen = random.Random(seed).sample(calibration_images, min(CALIBRATION_IMAGES, len(calibration_images)))

    def build() -> Int8Report:
        with tempfile.TemporaryDirectory() as work:
            fp32, prepared = fp32_onnx or Path(work) / "fp32.onnx", Path(work) / "prepared.onnx"
            if fp32_onnx is None:
                fp32_parity = export_onnx(artifact_dir, fp32, [path for path, _ in validation[:PARITY_BATCH_SIZE]])
                if not fp32_parity.passed:
                    raise RuntimeError(f"the fp32 graph to quantize failed its own parity check: {fp32_parity.as_dict()}")
            quant_pre_process(str(fp32), str(prepared))  # shape inference and graph folding, as onnxruntime advises
            quantize_static(
                str(prepared), str(out_path), _Calibration(chosen, transform),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=_head_and_after(onnx.load(str(prepared), load_external_data=False)),
            )  # fmt: skip
        return _int8_parity(wrapper, out_path, validation, len(chosen), min_agreement, max_accuracy_drop)

    return _kept_if_passed(out_path, build)


class _Calibration(CalibrationDataReader):
    """Training images one at a time, preprocessed exactly as served."""

    def __init__(self, images: list[Path], transform):
        self.images, self.transform = iter(images), transform

    def get_next(self) -> dict | None:
        path = next(self.images, None)
        return None if path is None else {INPUT_NAME: self.transform(load_rgb(path)).unsqueeze(0).numpy()}


def _head_and_after(model: onnx.ModelProto) -> list[str]:
    """The names of the last Gemm/MatMul (the classifier) and every node after it (the graph's
    nodes are in topological order)."""
    nodes = list(model.graph.node)
    last = max(i for i, node in enumerate(nodes) if node.op_type in ("Gemm", "MatMul"))
    return [node.name for node in nodes[last:]]


def _int8_parity(wrapper: CalibratedClassifier, out_path: Path, validation: list[tuple[Path, int]],
                 calibration_images: int, min_agreement: float, max_accuracy_drop: float) -> Int8Report:  # fmt: skip
    transform = pixel_transform(wrapper.model)
    session = onnxruntime.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    agreeing = right_fp32 = right_int8 = 0
    max_diff = 0.0
    for start in range(0, len(validation), PARITY_BATCH_SIZE):
        batch = validation[start : start + PARITY_BATCH_SIZE]
        pixels = torch.stack([transform(load_rgb(path)) for path, _ in batch])
        labels = np.array([label for _, label in batch])
        with torch.inference_mode():
            reference = wrapper(pixels).numpy()
        (quantized,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})
        agreeing += int((quantized.argmax(axis=1) == reference.argmax(axis=1)).sum())
        right_fp32 += int((reference.argmax(axis=1) == labels).sum())
        right_int8 += int((quantized.argmax(axis=1) == labels).sum())
        max_diff = max(max_diff, float(np.abs(quantized.astype(np.float64) - reference).max()))
    images = len(validation)
    agreement, accuracy_fp32, accuracy_int8 = agreeing / images, right_fp32 / images, right_int8 / images
    return Int8Report(
        images=images, calibration_images=calibration_images, top1_agreement=agreement, accuracy_fp32=accuracy_fp32,
        accuracy_int8=accuracy_int8, max_abs_prob_diff=max_diff,
        passed=agreement >= min_agreement and accuracy_fp32 - accuracy_int8 <= max_accuracy_drop,
    )  # fmt: skip


def _kept_if_passed(out_path: Path, build):
    """Run `build`, which writes `out_path` and returns its parity report: the file stays only if
    the report passed (and never after an error)."""
    try:
        report = build()
    except BaseException:
        _remove(out_path)
        raise
    if not report.passed:
        _remove(out_path)
    return report


def _remove(out_path: Path) -> None:
    out_path.unlink(missing_ok=True)
    out_path.with_name(out_path.name + ".data").unlink(missing_ok=True)  # external weights, if any
