"""Two ranks whose data differ: every rank must run the same modules every step.

One shard has `future` and teacher features in every row, the other in none; each rank reads one
of them. Before the fix, ZeRO-2 aborted in `engine.backward` ("Received data size doesn't match
expected size") and ZeRO-3 in the forward. Marked slow: each case is two torchrun launches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_config, settings_for, synthetic_row

from empathy_distill.shared.schema import write_manifest, write_shard

pytestmark = pytest.mark.slow
ROWS = 8


def skewed_cache(folder: Path, tokenizer) -> Path:
    """shard 0: situation + future + features in every row; shard 1: situation only, no
    features. One row group per shard, so rank 0 reads shard 0 and rank 1 shard 1."""
    folder.mkdir(parents=True)
    settings = settings_for(tokenizer)
    meta = {"pipeline_settings": json.dumps(settings)}
    entries = []
    for index in range(2):
        rng = np.random.default_rng(index)
        batch = []
        for j in range(ROWS):
            row = synthetic_row(index * 1000 + j, rng)
            privileged = dict(row["privileged"])
            if index == 0:
                privileged["future"] = "Listener: that is hard. Speaker: it is."
            else:
                privileged.pop("future", None)
                row["teacher_features"] = []
            row["privileged"] = list(privileged.items())
            row["improvement_strategy"] = "all"
            row["base_response"] = "Ok." if j % 2 else "Whatever, move on."
            batch.append(row)
        path = folder / f"shard-{index:05d}.parquet"
        entries.append(write_shard(batch, path, ROWS, metadata=meta))
    write_manifest(folder, {"settings": settings, "shards": entries, "rows": 2 * ROWS})
    return folder


def torchrun(config: Path, port: int) -> subprocess.CompletedProcess:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2"]
    cmd += ["--master_port", str(port), "-m", "empathy_distill.stage2_distill.distill"]
    cmd += ["--config", str(config), "--pipeline", "t"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method", ["pride", "sft-dpo"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_skewed_ranks_train_resume_and_export(tmp_path, tiny_student, method, stage):
    from transformers import AutoModelForCausalLM

    from empathy_distill.shared.models import load_tokenizer

    cache = skewed_cache(tmp_path / "cache", load_tokenizer(tiny_student))
    out = tmp_path / "out"
    common = {
        "method": method,
        "deepspeed": str(REPO / "configs" / f"zero{stage}.json"),
        "checkpoint_every": 1,
        "privileged_dropout": 0.5,
        "sft_steps": 1,
    }
    port = 29600 + 10 * stage + (method == "pride")
    first = make_config(tmp_path, tiny_student, cache, out, max_steps=2, dpo_steps=1, **common)
    done = torchrun(first, port)
    assert done.returncode == 0, done.stderr[-3000:]
    again = make_config(tmp_path, tiny_student, cache, out, max_steps=3, dpo_steps=2, **common)
    done = torchrun(again, port + 1)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["resumed from"] == "step0000002"
    assert summary["steps"] == "2 -> 3 (of 3)"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    if method == "pride":  # the rank with features and the rank without both count
        assert all(m["mmd"] >= 0 for m in metrics)
    plain = AutoModelForCausalLM.from_pretrained(tiny_student)
    exported = AutoModelForCausalLM.from_pretrained(out / "final")
    assert set(exported.state_dict()) == set(plain.state_dict())
