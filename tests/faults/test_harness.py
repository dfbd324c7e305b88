"""The fault harness itself.

test_training_faults' module fixture failed now and then with both ranks exiting 1: every rank writes
the same recipe file, and a rank that read it while another had just truncated it for rewriting got an
empty config (teacher ''), failed that scenario alone and left its peer waiting in a collective until
dist_timeout_s, after which both exited. `write_recipe` now replaces the file atomically.
"""

from __future__ import annotations

import threading

import yaml

from faults.conftest import write_recipe


def test_a_recipe_rewritten_concurrently_is_never_read_half_written(tmp_path):
    path = write_recipe(tmp_path)
    expected = yaml.safe_load(path.read_text())
    stop = threading.Event()

    def rewrite():  # another rank writing the same recipe
        while not stop.is_set():
            write_recipe(tmp_path)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        reads = [yaml.safe_load(path.read_text()) for _ in range(500)]
    finally:
        stop.set()
        writer.join()
    assert all(r == expected for r in reads)
