"""Before a session's GPU checks, on the development machine: fill `.gpu/` (ignored by git) with
what a lent GPU machine lacks and the device tool can carry, for `bench/gpu_session.sh` there.

    python bench/gpu_pack.py

- `.gpu/wheels/`: the wheels, for the GPU machine's Python (3.12), of every package the service
  needs at run time beyond what that machine's image already holds. The needs are read from this
  checkout's installed environment (`make install`), walking `pyproject.toml`'s dependencies;
  what the image holds is GPU_IMAGE below. The S3 and PostgreSQL clients are left out (the checks
  run on the embedded defaults), and so is the SDK (clients/python, on PYTHONPATH there).
- `.gpu/deb/`: Debian's wrk and its Lua library (bench/serve_wrk.py's load generator).
- `.gpu/shared`: a link to ../shared. The device tool carries the files named through it.

A call carries at most 64 MiB, and the wheels, the weights and the photos together are more. So
the checks take two calls back to back, within the 30 s a machine stays warm (what the first
installs outside the checkout stays there):

    run(command="bash bench/gpu_session.sh install", carry=[".gpu/wheels", ".gpu/deb",
        ".gpu/shared/weights/mobilenetv2_100.tv_in1k.safetensors"], timeout_s=300)
    run(command="bash bench/gpu_session.sh run", carry=[".gpu/shared/datasets/hymenoptera"], timeout_s=600)
"""

import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / ".gpu"
PYTHON = "3.12"  # the GPU machine's python3
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
# The GPU machine image's Python packages that the service uses, as the device tool's notes listed
# them on 2026-11-17 (its PyTorch is a CUDA build; carrying another would take gigabytes).
GPU_IMAGE = """
annotated-doc anyio certifi click cloudpickle filelock flatbuffers fsspec h11 hf-xet httpcore httpx huggingface-hub
idna jinja2 joblib markupsafe ml-dtypes mpmath narwhals networkx numpy onnx onnx-ir onnxruntime onnxscript packaging
pandas pillow prometheus-client protobuf python-dateutil pyyaml safetensors scikit-learn scipy setuptools six sympy
threadpoolctl timm torch torchvision tqdm triton typing-extensions urllib3 uvloop
""".split()
CUDA_PREFIXES = ("nvidia-", "cuda-")  # PyTorch's CUDA libraries, there with it
LEFT_OUT = {"boto3", "botocore", "s3transfer", "jmespath", "psycopg", "psycopg-binary", "visiontune-client"}
DEBIAN = ["wrk", "libluajit-5.1-2", "libluajit-5.1-common"]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_needs() -> dict[str, str]:
    """name -> installed version of every package `pyproject.toml`'s dependencies pull in."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    found: dict[str, str] = {}
    pending = [Requirement(d) for d in dependencies]
    while pending:
        requirement = pending.pop()
        if normal(requirement.name) in found:
            continue
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:
            continue  # a dependency for another platform or Python
        found[normal(requirement.name)] = dist.version
        for text in dist.requires or []:
            needed = Requirement(text)
            extras = ["", *requirement.extras]
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in extras):
                pending.append(needed)
    return found


def main() -> None:
    there = set(GPU_IMAGE) | LEFT_OUT
    wanted = {n: v for n, v in runtime_needs().items() if n not in there and not n.startswith(CUDA_PREFIXES)}
    shutil.rmtree(PACK, ignore_errors=True)
    (PACK / "deb").mkdir(parents=True)
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", PYTHON, "--implementation", "cp", *platforms, "-d", str(PACK / "wheels"),
                    *(f"{n}=={v}" for n, v in sorted(wanted.items()))], check=True)  # fmt: skip
    subprocess.run(["apt-get", "download", *DEBIAN], cwd=PACK / "deb", check=True)
    (PACK / "shared").symlink_to(REPO.parent / "shared")
    for name, paths in [("wheels", (PACK / "wheels").iterdir()), ("deb", (PACK / "deb").iterdir())]:
        print(f".gpu/{name}: {sum(p.stat().st_size for p in paths) / 2**20:.1f} MiB")
    print(f"{len(wanted)} wheels: {' '.join(sorted(wanted))}")


if __name__ == "__main__":
    main()
