"""`visiontune worker --gpus 0,1`: one training worker per listed GPU, each seeing only its own
(CUDA_VISIBLE_DEVICES), all stopped together. This machine has no GPU: what is checked is the
process layout the command sets up, with real Celery workers."""

import os
import sys
from pathlib import Path

import pytest

from tests.conftest import WEIGHTS_DIR, Process, empty_hub_env, wait_until

pytestmark = pytest.mark.e2e


def celery_workers_of(data_dir: Path) -> dict[int, str]:
    """pid -> CUDA_VISIBLE_DEVICES of the Celery worker main processes using this data directory."""
    marker = f"VISIONTUNE_DATA_DIR={data_dir}".encode()
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ and b"celery" in argv and b"--hostname" in argv and b"worker" in argv:
            devices = next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"CUDA_VISIBLE_DEVICES=")), "")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"celery" not in (Path(f"/proc/{parent}/cmdline").read_bytes() if Path(f"/proc/{parent}").exists() else b""):
                found[int(proc.name)] = devices  # a main process, not one of its pool processes
    return found


def test_one_worker_per_gpu_each_with_its_own(tmp_path):
    data_dir = tmp_path / "var"
    env = {**os.environ, "VISIONTUNE_DATA_DIR": str(data_dir), "VISIONTUNE_WEIGHTS_DIR": str(WEIGHTS_DIR),
           **empty_hub_env(tmp_path)}  # fmt: skip
    visiontune = Path(sys.executable).parent / "visiontune"
    process = Process("gpus", [str(visiontune), "worker", "--gpus", "0,1"], env, tmp_path)
    try:
        workers = wait_until(lambda: (found := celery_workers_of(data_dir)) and len(found) == 2 and found, 120,
                             "two workers", processes=[process])  # fmt: skip
        assert sorted(workers.values()) == ["0", "1"]
        process.popen.terminate()
        assert process.popen.wait(timeout=120) == 0  # a stop that was asked for
        wait_until(lambda: not celery_workers_of(data_dir), 60, "the workers to stop")
    finally:
        process.stop()
