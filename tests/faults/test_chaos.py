"""bench/chaos.py, bounded for CI: operations of every kind while random workers, the API and
redis-server are killed and restarted; afterwards every invariant holds."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def test_a_short_chaos_run_breaks_no_invariant():
    run = subprocess.run([sys.executable, "bench/chaos.py", "--seconds", "75", "--seed", "1"], cwd=REPO,
                         capture_output=True, text=True, timeout=1200)  # fmt: skip
    print(run.stdout)  # the counts, for the log
    assert run.returncode == 0 and "invariant violations: 0" in run.stdout, run.stdout + run.stderr[-5000:]
    kills = int(run.stdout.split("kills: ")[1].split()[0])
    operations = int(run.stdout.split("operations: ")[1].split()[0])
    assert kills >= 4 and operations >= 50, run.stdout
