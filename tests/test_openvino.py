"""The OpenVINO backend's tests (``isolated/openvino_cases.py``), run in a process of their own.

OpenVINO's runtime (its own thread pool and allocator) stays loaded once imported; beside torch,
onnxruntime and the browser tests of a whole pytest session it has crashed the session's process late in
the run. In a child process the cases run as they would alone, and the session only reads the verdict.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

HERE = Path(__file__).parent


def test_openvino_backend_cases_pass_in_their_own_process():
    cases = HERE / "isolated" / "openvino_cases.py"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(cases),
        "--rootdir",
        str(HERE),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
