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
    command = [sys.executable, "-m", "espmedsam", "serve", "--port", "0", "--log-level", "warning"]
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
