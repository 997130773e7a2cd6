"""Stage one on a local Ray cluster: two workers, each owning a real vLLM engine (marked `engine`).

The tiny random teacher keeps the engines quick; what is under test is the split into units, the
shard names, the one manifest writer, and what happens when a worker is killed mid-unit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import DATA, ENGINE, GATE_OFF, REPO, long_jsonl, make_cfg, shard_rows

from empathy_distill.shared.readers import read_examples
from empathy_distill.shared.schema import verify_cache

pytestmark = pytest.mark.engine

RAY = {"backend": "ray", "workers": 2}


def dialogues(folder: Path, n: int) -> Path:
    """`n` short dialogues no test data set holds (so every example is new to the cache)."""
    topics = ["my sister's wedding", "a failed exam", "our new puppy", "moving abroad", "my job"]
    path = folder / "more.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "dialogue": [
                        {"role": "speaker", "text": f"Day {i}: I keep thinking about {t}."},
                        {"role": "listener", "text": "Tell me more?"},
                        {"role": "speaker", "text": f"It has been {i} weeks and it still hurts."},
                    ],
                    "privileged": {"situation": f"Week {i} after {t}."},
                }
            )
            + "\n"
            for i, t in ((i, topics[i % len(topics)]) for i in range(n))
        )
    )
    return path


def test_two_ray_workers_equal_one_process(tiny_teacher, tmp_path):
    """The same example ids, replies, top-k and features as the in-process run (greedy), one
    manifest with every example once, and a second run that does no teacher work."""
    from empathy_distill.stage1_teacher import teacher_cache

    inputs = [DATA / "ed_sample.csv", long_jsonl(tmp_path)]
    local = teacher_cache.main(make_cfg(tiny_teacher, inputs, tmp_path / "local", shard_size=2))
    on_ray = teacher_cache.main(
        make_cfg(tiny_teacher, inputs, tmp_path / "ray", shard_size=2, **RAY)
    )
    assert on_ray["workers"] == 2 and local["workers"] == 1
    for key in ("examples_read", "accepted", "rejected", "new_examples", "new_shards", "rows"):
        assert on_ray[key] == local[key], key

    def by_id(folder: Path) -> dict[str, dict]:
        return {r["example_id"]: r for r in shard_rows(folder)}

    a, b = by_id(tmp_path / "local"), by_id(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(shard_rows(tmp_path / "ray")) == len(b)
    for i in a:
        for col in ("teacher_response", "response_token_ids"):
            assert a[i][col] == b[i][col], (i, col)
        assert np.array_equal(a[i]["topk_token_ids"], b[i]["topk_token_ids"]), i
        for col in ("topk_logprobs", "teacher_features"):
            assert np.allclose(a[i][col], b[i][col], atol=1e-3), (i, col)
    # the units are the same whatever the backend: the same shard files
    files = {p.name for p in (tmp_path / "local").glob("shard-*.parquet")}
    assert files == {p.name for p in (tmp_path / "ray").glob("shard-*.parquet")}
    assert not list((tmp_path / "ray").glob("*.tmp")) and not list((tmp_path / "ray").glob(".*"))
    assert not list((tmp_path / "ray").glob("rejects-*.jsonl"))  # merged into rejects.jsonl
    verify_cache(tmp_path / "ray", top_k=5)
    again = teacher_cache.main(make_cfg(tiny_teacher, inputs, tmp_path / "ray", **RAY))
    assert again["new_examples"] == 0 and again["workers"] == 0


def worker_pids(title: str) -> list[int]:
    """Processes whose title starts with `title` (Ray names an actor's process after the
    method it is running: `ray::CacheWorker.run`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if cmdline.startswith(title):
            pids.append(int(entry.name))
    return pids


def test_a_worker_killed_mid_unit_loses_and_duplicates_nothing(tiny_teacher, tmp_path):
    """kill -9 a Ray worker while it answers a unit: its unit is redone by a worker, the job
    ends with every example exactly once; a second writer on the same folder is refused; a
    rerun does no teacher work, and a new input file only its own examples."""
    more = dialogues(tmp_path, 24)
    out = tmp_path / "cache"
    teacher = {"model": str(tiny_teacher), "max_new_tokens": 32, "engine": ENGINE}
    cache = {
        "inputs": [str(more)],
        "output": str(out),
        "top_k": 5,
        "shard_size": 2,
        "features": True,
        "quality": GATE_OFF,
        **RAY,
    }
    config = tmp_path / "pipelines.yaml"
    config.write_text(
        yaml.safe_dump({"pipelines": {"t": {"teacher": teacher, "teacher_cache": cache}}})
    )
    cmd = [sys.executable, "-m", "empathy_distill.cli", "teacher-cache", "--config", str(config)]
    cmd += ["--pipeline", "t"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killed = None
    try:
        deadline = time.time() + 400
        # once a shard is written both engines are up; then kill a worker inside `run`
        while time.time() < deadline and killed is None and proc.poll() is None:
            if list(out.glob("shard-*.parquet")):
                busy = worker_pids("ray::CacheWorker.run")
                if busy:
                    os.kill(busy[0], signal.SIGKILL)
                    killed = busy[0]
            time.sleep(0.05)
        assert killed is not None, "no worker was caught inside a unit"
        # a second writer on the same folder is refused in one line while the first runs
        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert second.returncode == 1 and "is in use by teacher-cache" in second.stderr
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-3000:]
    assert "died (" in log and "it goes to the next free worker" in log
    ids = [r["example_id"] for r in shard_rows(out)]
    expected = {e.example_id for e in read_examples(more)[0]}
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    verify_cache(out, top_k=5)

    # Rerun: no teacher work (no engine, no Ray workers). A new input: only its examples.
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "for the teacher" not in again.stdout, again.stderr[-2000:]
    cache["inputs"].append(str(DATA / "ed_sample.csv"))
    config.write_text(
        yaml.safe_dump({"pipelines": {"t": {"teacher": teacher, "teacher_cache": cache}}})
    )
    third = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-2000:]
    n_new = len(read_examples(DATA / "ed_sample.csv")[0])
    assert f"{n_new} new examples for the teacher" in third.stdout
    ids = [r["example_id"] for r in shard_rows(out)]
    assert len(ids) == len(set(ids)) == len(expected) + n_new
    verify_cache(out, top_k=5)
