"""One writer per run folder: a second process is refused with a line naming the folder and the
holder; a lock left by a killed process is taken over with a warning."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.errors import HarnessError
from harness.lock import LOCK_NAME, acquire, release, run_lock

HOLD = """
import sys, time
from harness.lock import acquire
acquire(sys.argv[1], "harness eval")
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run's lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_second_writer_is_refused_naming_the_holder(holder, tmp_path):
    with pytest.raises(HarnessError, match=rf"run: in use by harness eval \(pid {holder.pid} on .*\); wait") as e:
        acquire(tmp_path / "run", "harness train")
    assert "\n" not in str(e.value)
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == holder.pid  # untouched


def test_lock_of_a_killed_process_is_taken_over(holder, tmp_path, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING), run_lock(tmp_path / "run", "harness eval") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert not path.exists()  # released on exit


def test_eval_refuses_a_folder_in_use_before_generating(holder, tmp_path, zoo_dir):
    from harness.eval.runner import run_eval

    suite = tmp_path / "suite.yaml"
    (tmp_path / "p.txt").write_text("a cat\n")
    suite.write_text(f"name: s\nversion: '1'\nseeds: [0]\nprompts: {{p: {{file: p.txt}}}}\n"
                     f"generation: {{width: 64, height: 64, steps: 2}}\nmodels: {{clip: {zoo_dir / 'clip'}}}\n"
                     "metrics: {clip_score: {}}\n")
    t0 = time.time()
    with pytest.raises(HarnessError, match=r"in use by harness eval"):
        run_eval(suite, base=str(zoo_dir / "sd"), candidates=[str(zoo_dir / "sd")], out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "run.json").exists() and time.time() - t0 < 60


def test_release_leaves_another_process_lock_alone(holder, tmp_path):
    release(tmp_path / "run" / LOCK_NAME)
    assert (tmp_path / "run" / LOCK_NAME).exists()


def test_training_refuses_an_output_dir_in_use(holder, tmp_path, tiny_sd_dir):
    from _train_helpers import make_dataset, quick_recipe

    from harness.train.loop import train

    recipe = quick_recipe(tiny_sd_dir, make_dataset(tmp_path / "data"), tmp_path)  # output_dir = tmp_path/run
    with pytest.raises(HarnessError, match=r"run: in use by harness eval"):
        train(recipe)
    assert not (tmp_path / "run" / "recipe.yaml").exists()
