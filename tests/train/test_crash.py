"""Training survives SIGKILL: mid-epoch, and in the middle of writing a checkpoint.

Each run is a real ``espmedsam train`` process. A small driver slows every step (so the kill lands where
the test wants it) or stalls a checkpoint write half-way, then the test kills it with SIGKILL, resumes
with ``--resume`` and compares the final state with an uninterrupted run of the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from espmedsam.checkpoints.native import load_model
from espmedsam.train.state import load_state

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

# The driver runs the real command line. SLOW_STEP_S sleeps after each step; STALL_AT_STEP makes the
# checkpoint write of that step stop half-way (after writing half the bytes of state.pt), touch MARKER
# and wait to be killed.
DRIVER = textwrap.dedent(
    """
    import io, os, sys, time
    from pathlib import Path
    import espmedsam.train.loop as loop
    import espmedsam.train.state as state
    from espmedsam.cli import app

    slow = float(os.environ.get("SLOW_STEP_S", "0"))
    stall_at = int(os.environ.get("STALL_AT_STEP", "0"))
    marker = Path(os.environ.get("MARKER", "marker"))
    train_step, atomic_write = loop._Trainer._train_step, state.atomic_write
    current = {"step": 0}

    def slow_step(self, *args, **kwargs):
        train_step(self, *args, **kwargs)
        current["step"] = self.counters.step
        time.sleep(slow)

    def stalling_write(path, write, **kwargs):
        if current["step"] != stall_at:
            return atomic_write(path, write, **kwargs)

        def half(file):
            buffer = io.BytesIO()
            write(buffer)
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            file.flush()
            marker.touch()
            time.sleep(120)

        return atomic_write(path, half, **kwargs)

    loop._Trainer._train_step, state.atomic_write = slow_step, stalling_write
    app(prog_name="espmedsam", args=sys.argv[1:])
    """
)


def _command(config_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", DRIVER, "train", "--config", str(config_path), *extra]


def _env(**values: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **values}


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended (code {process.returncode}) before the kill")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.02)


def _logged_steps(run_dir: Path) -> list[int]:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return []
    return [json.loads(line)["step"] for line in log.read_text().splitlines()]


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def _run(config_path: Path, *extra: str) -> None:
    done = subprocess.run(_command(config_path, *extra), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _assert_same_state(a_dir: Path, b_dir: Path) -> None:
    a, b = load_state(a_dir / "state.pt"), load_state(b_dir / "state.pt")
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, moments in a["optimizer"]["state"].items():
        for name, tensor in moments.items():
            assert torch.equal(tensor, b["optimizer"]["state"][index][name]), (index, name)
    timing = ("elapsed_s", "val_seconds", "setup_s")  # wall times, which differ between any two runs
    counters = [{k: v for k, v in state["counters"].items() if k not in timing} for state in (a, b)]
    assert counters[0] == counters[1]


@pytest.fixture
def crash_config(tiny_config, tmp_path):
    """Two epochs of four steps, a checkpoint every three steps, in fp32 (bitwise comparable)."""
    config = dataclasses.replace(
        tiny_config, bf16=False, epochs=2, steps_per_epoch=4, checkpoint_every=3, val_every=1
    )

    def write(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(dataclasses.replace(config, out_dir=str(tmp_path / name)).to_yaml())
        return path

    return write


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(crash_config, tmp_path):
    whole, parted = crash_config("whole"), crash_config("parted")
    _run(whole)
    run_dir = tmp_path / "parted"
    process = subprocess.Popen(_command(parted), env=_env(SLOW_STEP_S="0.5"), stderr=subprocess.DEVNULL)
    # killed after step 5: mid-epoch 2, two steps past the last checkpoint (step 3)
    _wait_for(lambda: 5 in _logged_steps(run_dir), process)
    _kill(process)
    assert load_state(run_dir / "state.pt")["step"] == 3
    _run(parted, "--resume")
    _assert_same_state(tmp_path / "whole", run_dir)
    assert _logged_steps(run_dir) == _logged_steps(tmp_path / "whole")  # steps 4-5 logged once
    assert load_model(run_dir / "last.safetensors").config.name == "tiny"


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_whole(crash_config, tmp_path):
    whole, parted = crash_config("whole"), crash_config("parted")
    _run(whole)
    run_dir, marker = tmp_path / "parted", tmp_path / "stalled"
    env = _env(STALL_AT_STEP="6", MARKER=str(marker))
    process = subprocess.Popen(_command(parted), env=env, stderr=subprocess.DEVNULL)
    _wait_for(marker.exists, process)  # half of step 6's state.pt is on disk
    _kill(process)
    leftovers = list(run_dir.glob(".state.pt.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    assert load_state(run_dir / "state.pt")["step"] == 3  # the previous checkpoint, intact
    _run(parted, "--resume")
    _assert_same_state(tmp_path / "whole", run_dir)
    assert not list(run_dir.glob(".*.tmp"))  # the resumed run removed the half-written file
