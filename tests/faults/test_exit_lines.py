"""How a failed process ends (mope_dist.dist.install_failure_handlers): one last line saying why, and an
exit status that tells bad input (2) from a failure (1) from a stop by signal (143)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from faults.conftest import REPO, launcher_env

PRELUDE = "from mope_dist import dist; dist.install_failure_handlers(); "
CASES = {
    "config": "from mope_dist.errors import ConfigError; raise ConfigError('data.batch_size: bad')",
    "job": "dist.note_progress(step=7); raise dist.JobError('disk full')",
    "collective": "raise RuntimeError('[../gloo/pair.cc:1] Connection closed by peer [10.0.0.2]:1234')",
    "sigterm": "print('ready', flush=True); import time; time.sleep(60)",
}


@pytest.fixture(scope="module")
def ended() -> dict:
    """Every case in its own process, all started at once (interpreter start-up dominates)."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", PRELUDE + code],
            cwd=REPO,
            env=launcher_env(RANK=3, WORLD_SIZE=4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, code in CASES.items()
    }
    assert procs["sigterm"].stdout.readline().strip() == "ready"
    start = time.monotonic()
    procs["sigterm"].send_signal(signal.SIGTERM)
    out = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        out[name] = (proc.returncode, err.strip())
    out["sigterm_s"] = time.monotonic() - start
    return out


@pytest.mark.parametrize(
    "case, status, line",
    [
        ("config", 2, "[rank 3] config error: data.batch_size: bad"),
        ("job", 1, "[rank 3] error: disk full [step 7]"),
        ("collective", 1, "[rank 3] error: a collective operation failed: another process died, was killed"),
    ],
)
def test_uncaught_errors_end_with_one_line(ended, case, status, line):
    returncode, err = ended[case]
    assert returncode == status
    assert err.splitlines()[-1].startswith(line)
    if case != "collective":  # expected failures: the line alone, no traceback
        assert err == err.splitlines()[-1]


def test_sigterm_says_why_and_exits_143(ended):
    returncode, err = ended["sigterm"]
    assert returncode == 143 and ended["sigterm_s"] < 30
    assert err.startswith("[rank 3] received SIGTERM (the launcher stops every rank when one fails")
