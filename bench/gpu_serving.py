"""The GPU serving path piece by piece: is the small-batch forward launch-bound, and does GPU JPEG
decoding beat the CPU's?

    python bench/gpu_serving.py --artifact DIR [--images DIR]

For a trained model's artifact (a `models/<id>` folder of the service), served as the API serves
it (the calibrated classifier, channels_last, pixels copied in and probabilities copied out):
- milliseconds per call at batch 1, 8 and 64: eager fp32 (what the API runs), eager under fp16
  autocast, one CUDA graph per batch size replayed (`torch.cuda.CUDAGraph`), and
  `torch.compile` in its default mode (kernels fused, no graphs);
  each checked against eager fp32;
- JPEG decode + preprocess images/s: the API's Pillow path (DCT-scaled decode, the eval
  transform) on one thread and on one thread per core, against `torchvision.io.decode_jpeg` on the
  GPU in batches of 64 with the resize and crop on the GPU, and how far apart their pixels are.
"""

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from timm.data import resolve_model_data_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.config import Settings  # noqa: E402
from app.serving.predictor import LoadedModel, ModelCache, preprocess  # noqa: E402
from bench.handwritten import HYMENOPTERA  # noqa: E402

CORES = len(os.sched_getaffinity(0))


def per_call_ms(call, inputs: list[torch.Tensor], repeats: int = 200) -> float:
    """Median milliseconds of `call` over rotating CPU inputs (the result comes back to the CPU,
    which waits for the GPU)."""
    for x in inputs[:3]:
        call(x)
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        call(inputs[i % len(inputs)])
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def graphed(module: torch.nn.Module, batch: int, size: tuple[int, ...]):
    """One CUDA graph for this batch size: a call copies its input into the graph's, replays, and
    copies the output out."""
    static_in = torch.rand(batch, *size, device="cuda").contiguous(memory_format=torch.channels_last)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm-up outside the capture, as CUDA graphs require
            module(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = module(static_in)

    def call(x: torch.Tensor) -> torch.Tensor:
        static_in.copy_(x, non_blocking=True)
        graph.replay()
        return static_out.cpu()

    return call


def forward_table(classifier: torch.nn.Module, size: tuple[int, ...]) -> None:
    compiled = torch.compile(classifier, dynamic=False)
    for batch in (1, 8, 64):
        inputs = [torch.rand(batch, *size) for _ in range(8)]

        def eager(x, model=classifier):
            with torch.inference_mode():
                return model(x.to("cuda").contiguous(memory_format=torch.channels_last)).cpu()

        def fp16(x):
            with torch.autocast("cuda", dtype=torch.float16):
                return eager(x).float()

        def compiled_call(x):
            return eager(x, compiled)

        started = time.perf_counter()
        compiled_call(inputs[0])
        compile_s = time.perf_counter() - started
        variants = {"eager fp32 (the API)": eager, "eager fp16 autocast": fp16,
                    "CUDA graph fp32": graphed(classifier, batch, size), "torch.compile fp32": compiled_call}  # fmt: skip
        reference = eager(inputs[0]).double()
        row = []
        for name, call in variants.items():
            error = ((call(inputs[0]).double() - reference).norm() / reference.norm()).item()
            ms = per_call_ms(call, inputs)
            row.append(f"{name} {ms:.2f} ms ({batch / ms * 1000:.0f} img/s, rel. error {error:.1e})")
        print(f"batch {batch:2d}: " + "; ".join(row) + f"; torch.compile took {compile_s:.0f} s", flush=True)


def gpu_preprocess(data: list[bytes], resize: int, crop: int) -> torch.Tensor:
    """[0, 1] pixels as the eval transform makes them, decoded, resized and cropped on the GPU."""
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    decoded = torchvision.io.decode_jpeg(encoded, device="cuda", mode=torchvision.io.ImageReadMode.RGB)
    out = torch.empty(len(data), 3, crop, crop, device="cuda")
    for i, image in enumerate(decoded):
        height, width = image.shape[1:]
        scale = resize / min(height, width)
        size = (max(resize, round(height * scale)), max(resize, round(width * scale)))
        resized = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
        out[i] = resized[0, :, top : top + crop, left : left + crop] / 255
    return out


def decode_table(loaded: LoadedModel, images: list[bytes]) -> None:
    settings = Settings()

    def cpu(data: bytes) -> torch.Tensor:
        return preprocess(loaded, [("image.jpg", data)], settings.max_image_pixels)[0]

    started = time.perf_counter()
    cpu_pixels = [cpu(d) for d in images]
    one_thread = len(images) / (time.perf_counter() - started)
    with ThreadPoolExecutor(CORES) as pool:
        list(pool.map(cpu, images))
        started = time.perf_counter()
        list(pool.map(cpu, images * 3))
        all_threads = 3 * len(images) / (time.perf_counter() - started)
    crop = cpu_pixels[0].shape[-1]
    batches = [images[i : i + 64] for i in range(0, len(images), 64)]
    gpu_preprocess(batches[0], loaded.resize, crop)  # warm-up: nvjpeg handles and kernels
    torch.cuda.synchronize()
    started = time.perf_counter()
    gpu_pixels = torch.cat([gpu_preprocess(b, loaded.resize, crop) for b in batches * 3])
    torch.cuda.synchronize()
    gpu_rate = 3 * len(images) / (time.perf_counter() - started)
    difference = (gpu_pixels[: len(images)].cpu() - torch.stack(cpu_pixels)).abs()
    with torch.inference_mode():
        agree = (loaded.classifier(gpu_pixels[: len(images)].contiguous(memory_format=torch.channels_last)).argmax(1).cpu()
                 == loaded.classifier(torch.stack(cpu_pixels).to("cuda")).argmax(1).cpu()).float().mean().item()  # fmt: skip
    print(f"JPEG decode + preprocess of {len(images)} photos: Pillow (the API) {one_thread:.0f} img/s on one thread, "
          f"{all_threads:.0f} img/s on {CORES} threads; nvjpeg on the GPU in batches of 64 {gpu_rate:.0f} img/s "
          f"({gpu_rate / all_threads:.2f}x the CPU's {CORES} threads); pixels differ by {difference.mean():.4f} on "
          f"average (max {difference.max():.3f}); top-1 agreement {agree:.3f}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="a trained model's folder (<data dir>/models/<id>)")
    parser.add_argument("--images", type=Path, default=HYMENOPTERA / "val", help="a folder of JPEGs (searched recursively)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    images = [p.read_bytes() for p in sorted(args.images.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg")]
    loaded = ModelCache(10**12, 1, 0, "torch", "cuda").get("bench", args.artifact, {})
    print(f"{torch.cuda.get_device_name()}, PyTorch {torch.__version__}, {CORES} cores", flush=True)
    decode_table(loaded, images)
    forward_table(loaded.classifier, resolve_model_data_config(loaded.classifier.model)["input_size"])


if __name__ == "__main__":
    main()
