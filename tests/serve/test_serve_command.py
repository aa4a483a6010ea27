"""``espmedsam serve`` as a user starts it: the URL printed, the API up, a clean stop, one-line errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

# a server as a user starts it, in torch (OpenVINO would export the graph first: minutes)
SERVE = (sys.executable, "-m", "espmedsam", "serve", *"--port 0 --log-level warning --backend torch".split())


def _espmedsam(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "espmedsam", *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_a_taken_port_is_one_line_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _espmedsam("serve", "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "model.onnx"], "no ONNX backend"),
        (["--max-pixels", "0"], "must be positive"),
    ],
)
def test_bad_options_are_one_line(args, message):
    result = _espmedsam("serve", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_serve_prints_its_url_serves_and_cleans_its_workspace_on_ctrl_c(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    command = list(SERVE)
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = _wait_for_url(server)
        assert httpx.get(f"{url}/api/health", timeout=30).json()["status"] == "ok"
        assert len(list(tmp_path.glob("espmedsam-serve-*"))) == 1
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    assert server.returncode in (0, 130)  # 130: the shell's code for a Ctrl+C, as uvicorn re-raises it
    assert list(tmp_path.iterdir()) == []


def _wait_for_url(server: subprocess.Popen) -> str:
    deadline, seen = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        line = server.stderr.readline()
        seen += line
        found = re.search(r"http://127\.0\.0\.1:\d+", seen)
        if found:
            return found.group(0)
        if server.poll() is not None:
            break
    raise AssertionError(f"no URL printed: {seen!r}")


def test_two_workers_answer_behind_one_port_with_the_same_masks(tmp_path):
    import numpy as np
    from PIL import Image

    from espmedsam import build_model
    from espmedsam.checkpoints.native import save_model
    from espmedsam.serve.server import WORKER_HEADER

    checkpoint = save_model(build_model("tiny"), tmp_path / "tiny.safetensors")
    image = tmp_path / "case.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    command = list(SERVE)
    command += ["--workers", "2", "--checkpoint", str(checkpoint)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = _wait_for_url(server)
        masks = {}  # worker pid -> the mask it returned; each request on a new connection
        deadline = time.monotonic() + 90
        while len(masks) < 2 and time.monotonic() < deadline:
            try:
                files = {"file": ("case.png", image.read_bytes())}
                response = httpx.post(
                    f"{url}/api/segment", files=files, data={"modality": "fundus"}, timeout=30
                )
            except httpx.TransportError:  # the workers are still loading their models
                time.sleep(0.2)
                continue
            assert response.status_code == 200, response.text
            masks[response.headers[WORKER_HEADER]] = response.json()["mask_png"]
        assert len(masks) == 2, f"answers from {len(masks)} worker(s) only"
        assert len(set(masks.values())) == 1  # the same model in both: byte-identical masks
        assert all(int(pid) != server.pid for pid in masks)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    assert list(tmp_path.glob("espmedsam-serve-*")) == []  # each worker cleaned its workspace


def test_a_kill_of_the_parent_stops_every_worker(tmp_path):
    from espmedsam import build_model
    from espmedsam.checkpoints.native import save_model

    checkpoint = save_model(build_model("tiny"), tmp_path / "tiny.safetensors")
    command = list(SERVE)
    command += ["--workers", "2", "--checkpoint", str(checkpoint)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        url = _wait_for_url(server)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # both workers loaded (or at least answering)
            try:
                if httpx.get(f"{url}/api/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        workers = _children(server.pid)
        assert len(workers) == 2
    finally:
        server.terminate()  # SIGTERM, as kill and service managers send
        server.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(child) for child in open(path).read().split()] if os.path.exists(path) else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = (
        open(f"/proc/{pid}/stat").read().rsplit(")", 1)[-1].split()[0]
        if os.path.exists(f"/proc/{pid}/stat")
        else "X"
    )
    return state not in ("Z", "X")  # a zombie has exited


def test_workers_with_a_missing_checkpoint_is_one_line():
    result = _espmedsam("serve", "--port", "0", "--workers", "2", "--checkpoint", "missing.safetensors")
    assert (
        result.returncode == 4 and "missing.safetensors" in result.stderr and "Traceback" not in result.stderr
    )
