"""How an API process shares the machine with the others of `visiontune serve --workers N`."""

import os

import torch

from app.core.config import Settings
from app.serving.service import Serving


def test_each_of_several_api_processes_takes_its_share_of_the_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        alone = Serving(Settings(data_dir=tmp_path))
        assert alone.preprocess_limiter.total_tokens == cores and torch.get_num_threads() == threads
        shared = Serving(Settings(data_dir=tmp_path, api_workers=2))
        assert shared.preprocess_limiter.total_tokens == max(1, cores // 2)
        assert torch.get_num_threads() == max(1, cores // 2)
    finally:
        torch.set_num_threads(threads)
