"""scripts/gpu_smoke.py itself, run on the CPU (`--cpu`: fp32, gloo, vLLM's CPU build, no CUDA
graphs): every check it makes on a GPU runs here too, so a broken check shows before a GPU is
lent. What it proves about GPUs is only what it prints there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.engine]


def test_smoke_script_passes_on_the_cpu(tmp_path, embedded_teacher):
    report = tmp_path / "smoke.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_smoke.py"), "--cpu"]
    # The embedded teacher, not the random one: a random model's greedy reply turn is often "\n\n"
    # at once, an empty reply, and the comparison would rest on one or two replies.
    cmd += ["--teacher", str(embedded_teacher), "--report", str(report)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(report.read_text())["checks"]
    status = {c["check"]: c["status"] for c in checks}
    assert "FAIL" not in status.values()
    assert status["pride, ZeRO-3: resume continues"] == "PASS"
    for variant in ("eager", "chunked prefill + prefix caching + preemption"):
        assert status[f"stage one: {variant}: top-k and features vs transformers"] == "PASS"
    assert status["stage one: cuda graphs"] == "SKIP"
