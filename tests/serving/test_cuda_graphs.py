"""The PyTorch forward replayed as CUDA graphs on a GPU (app.serving.predictor.CudaGraphs).

The comparisons need a CUDA GPU and run where there is one (the lent GPU machines). Without one,
what is checked is that a CPU-served model never builds graphs."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.ml.backbone import CalibratedClassifier, build_model, unit_pixels
from app.ml.export import save_artifact
from app.serving.predictor import CudaGraphs, ModelCache
from tests.conftest import MOBILENET_WEIGHTS

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _classifier(device: str) -> CalibratedClassifier:
    model = build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS).eval()
    return CalibratedClassifier(model, 1.5).eval().to(device, memory_format=torch.channels_last)


def _eager(classifier: CalibratedClassifier, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return classifier(pixels.cuda().contiguous(memory_format=torch.channels_last)).cpu()


@needs_cuda
def test_replayed_graphs_answer_as_the_eager_forward_at_every_batch_size():
    classifier = _classifier("cuda")
    graphs = CudaGraphs(classifier, max_batch_size=8)
    # Sizes seen again replay the graph captured by their first call, out of the order of capture:
    # the graphs share one memory pool, and none may find another's activations in its own output.
    for batch in (1, 3, 8, 3, 1, 8):
        pixels = torch.rand(batch, 3, 224, 224)
        assert torch.allclose(graphs(pixels), _eager(classifier, pixels), atol=1e-6)
    assert sorted(size for size, _ in graphs._graphs) == [1, 3, 8]
    assert len({captured.graph.pool() for captured in graphs._graphs.values()}) == 1


@needs_cuda
def test_uint8_pixels_are_scaled_inside_graphs_of_their_own():
    classifier = _classifier("cuda")
    graphs = CudaGraphs(classifier, max_batch_size=8)
    pixels = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    scaled = unit_pixels(pixels)
    assert torch.equal(unit_pixels(pixels.cuda()).cpu(), scaled)  # the GPU's scaling is the CPU's, exactly
    assert torch.equal(graphs(pixels), graphs(scaled))
    assert torch.allclose(graphs(pixels), _eager(classifier, scaled), atol=1e-6)
    assert set(graphs._graphs) == {(4, torch.uint8), (4, torch.float32)}


@needs_cuda
def test_concurrent_callers_each_get_their_own_rows():
    classifier = _classifier("cuda")
    graphs = CudaGraphs(classifier, max_batch_size=8)
    inputs = [torch.rand(4, 3, 224, 224) for _ in range(16)]
    with ThreadPoolExecutor(8) as pool:
        replayed = list(pool.map(graphs, inputs))
    for pixels, output in zip(inputs, replayed, strict=True):
        assert torch.allclose(output, _eager(classifier, pixels), atol=1e-6)


def test_a_model_served_on_the_cpu_has_no_graphs(tmp_path):
    save_artifact(build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS), tmp_path, ["ants", "bees"], {}, 1.5)
    loaded = ModelCache(10**12, 8, 1.0, "torch", "cpu", cuda_graphs=True).get("m", tmp_path, {})
    assert loaded.graphs is None
    probabilities = loaded.probabilities(torch.rand(2, 3, 224, 224))
    assert probabilities.shape == (2, 2) and torch.allclose(probabilities.sum(1), torch.ones(2))
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)  # as the inference process passes them on
    assert torch.equal(loaded.probabilities(pixels), loaded.probabilities(unit_pixels(pixels)))
