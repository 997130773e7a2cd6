"""Stage one against the real vLLM engine (marked `engine`: ~30 s per engine start).

A 2-layer random model with the real SmolLM2 tokenizer keeps these quick; the behaviour under test
(logprobs, kept hidden states, batching, resume) is the engine's and ours, not the model's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    DATA,
    ENGINE,
    GATE_OFF,
    REPO,
    assert_features_match,
    long_jsonl,
    make_cfg,
    shard_rows,
)

from empathy_distill.shared.readers import read_examples
from empathy_distill.shared.schema import bucket_kl, verify_cache

pytestmark = pytest.mark.engine


def check_against_transformers(model_dir: Path, rows: list[dict]) -> None:
    """vLLM's top-k ids, top-1 and target log-probabilities equal transformers' on the same token
    ids (float32, 1e-3), and the pooled features within their int8 code step; the stored top-k
    distribution is within the encoding's contract of transformers' (mean bucket KL <= 1e-3)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    checked = 0
    for r in rows:
        ctx, reply = r["teacher_context_token_ids"], r["response_token_ids"]
        with torch.no_grad():
            out = model(torch.tensor([ctx + reply]), output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
        exact = []
        for t, token in enumerate(reply):
            dist = logp[len(ctx) + t - 1]  # the position that predicts reply token t
            assert abs(dist[token].item() - r["target_logprob"][t]) < 1e-3
            top = torch.from_numpy(r["topk_token_ids"][t]).long()
            assert abs(dist[top[0]].item() - r["topk_logprobs"][t][0]) < 1e-3
            # the stored ids really are the k best, best first (two ids whose log-probabilities
            # tie within float noise may come in either order: compare within the tolerance)
            best = torch.sort(dist, descending=True).values[: len(top)]
            assert torch.allclose(best, dist[top], atol=1e-3)
            exact.append(dist[top].numpy())
            checked += 1
        if exact:
            assert bucket_kl(np.stack(exact), r["topk_logprobs"]).mean() <= 1e-3
        # the states that predicted the reply tokens (the last context position for an empty one)
        states = torch.nn.functional.normalize(out.hidden_states[-1][0], dim=-1)
        span = states[len(ctx) - 1 : len(ctx) - 1 + max(len(reply), 1)]
        if len(r["teacher_features"]):  # empty when the cache was built with features off
            assert_features_match(span.mean(0), r["teacher_features"])
    assert checked > 0


def check_rescore(out: Path, teacher: Path, tmp_path: Path) -> None:
    """`pipeline inspect --rescore`: the cache matches its teacher; pointed at other weights
    (as if the teacher folder had changed), it does not, and the command exits 1."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from empathy_distill.cli import app
    from empathy_distill.shared.schema import read_manifest, write_manifest

    result = CliRunner().invoke(app, ["inspect", str(out), "--rescore", "4"])
    assert result.exit_code == 0, result.output
    assert "within tolerance" in result.output and "weights as when cached: yes" in result.output

    other = tmp_path / "other_teacher"
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(other)
    shutil.copytree(
        teacher, other, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors")
    )
    manifest = read_manifest(out)
    named = manifest["teacher_model"]
    write_manifest(out, {**manifest, "teacher_model": str(other)})
    result = CliRunner().invoke(app, ["inspect", str(out), "--rescore", "4"])
    write_manifest(out, {**manifest, "teacher_model": named})
    assert result.exit_code == 1, result.output
    assert "NOT within tolerance" in result.output and "NO (changed since)" in result.output


def test_cache_rerun_and_new_input(tiny_teacher, tmp_path, monkeypatch):
    from empathy_distill.stage1_teacher import teacher_cache

    out = tmp_path / "cache"
    ed = DATA / "ed_sample.csv"
    n_ex, n_rej = (len(x) for x in read_examples(ed))
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    summary = teacher_cache.main(make_cfg(tiny_teacher, [ed], out))
    # the runner choice was the engine's alone: other engines of the process choose their own
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ

    assert summary["examples_read"] == n_ex + n_rej
    assert summary["accepted"] + summary["rejected"] == summary["examples_read"]
    assert summary["new_examples"] == n_ex and summary["new_shards"] == -(-n_ex // 3)
    rows = shard_rows(out)
    assert sorted(r["example_id"] for r in rows) == sorted(
        e.example_id for e in read_examples(ed)[0]
    )
    assert all(len(r["topk_token_ids"]) == len(r["response_token_ids"]) for r in rows)
    assert all(len(r["teacher_features"]) == 128 for r in rows)
    assert (out / "resolved_config.yaml").exists() and not list(out.glob("*.tmp"))
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == n_rej and all(r["reason"] and r["origin"] for r in rejects)
    manifest = verify_cache(out, top_k=5)
    assert manifest["settings"]["top_k"] == 5 and manifest["settings"]["feature_dim"] == 128
    assert manifest["head_dtype"] == "float32" and manifest["model_runner"] == "v1"
    check_against_transformers(tiny_teacher, rows)
    check_rescore(out, tiny_teacher, tmp_path)

    # The same command again: no teacher work, no engine, finished shards untouched.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}

    def no_engine(*args, **kwargs):
        raise AssertionError("a rerun with nothing new must not start the engine")

    monkeypatch.setattr(teacher_cache, "start_engine", no_engine)
    again = teacher_cache.main(make_cfg(tiny_teacher, [ed], out))
    assert again["new_examples"] == 0 and again["already_cached"] == n_ex
    assert again["rejected"] == n_rej
    assert len((out / "rejects.jsonl").read_text().splitlines()) == n_rej  # not duplicated
    monkeypatch.undo()

    # A new input into the same output: only its new examples, old shards byte-identical.
    extra = long_jsonl(tmp_path)
    third = teacher_cache.main(make_cfg(tiny_teacher, [ed, extra], out))
    assert third["new_examples"] == 2 and third["already_cached"] == n_ex
    assert third["rejected"] == n_rej + 1
    assert any(
        "too long" in json.loads(x)["reason"]
        for x in (out / "rejects.jsonl").read_text().splitlines()
    )
    assert {p: m for p, m in before.items()} == {
        p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet") if p.name in before
    }
    ids = [r["example_id"] for r in shard_rows(out)]
    assert len(ids) == len(set(ids)) == n_ex + 2
    verify_cache(out, top_k=5)


def test_killed_run_resumes_without_loss_or_duplicates(tiny_teacher, tmp_path):
    """Kill the CLI (and its engine processes) mid-run, rerun, and every example is there once."""
    config = tmp_path / "pipelines.yaml"
    cache = {
        "inputs": [str(DATA / "ed_sample.csv"), str(long_jsonl(tmp_path))],
        "output": str(tmp_path / "cache"),
        "top_k": 5,
        "shard_size": 1,
        "features": False,
        "quality": GATE_OFF,
    }
    teacher = {"model": str(tiny_teacher), "max_new_tokens": 12, "engine": ENGINE}
    config.write_text(
        yaml.safe_dump({"pipelines": {"t": {"teacher": teacher, "teacher_cache": cache}}})
    )
    cmd = [
        sys.executable,
        "-m",
        "empathy_distill.cli",
        "teacher-cache",
        "--config",
        str(config),
        "--pipeline",
        "t",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    out = tmp_path / "cache"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("shard-*.parquet"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("shard-*.parquet")))
    assert done_before >= 3

    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = 8 + 2  # ed_sample's good examples + the two short JSONL records
    ids = [r["example_id"] for r in shard_rows(out)]
    assert len(ids) == len(set(ids)) == expected
    assert "new examples" in result.stdout
    verify_cache(out, top_k=5)


def test_embedded_teacher_through_the_cli(embedded_teacher, tmp_path):
    """The embedded default end to end on three demo examples, checked against transformers;
    the console shows the command's own lines, the engine's logs go to the cache's log file."""
    out = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "empathy_distill.cli",
        "teacher-cache",
        "--limit",
        "3",
        "--output",
        str(out),
        "--set",
        "teacher_cache.shard_size=2",
        "--set",
        "teacher.engine.kv_cache_memory_bytes=536870912",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "teacher-cache summary" in result.stdout and "bytes per reply token" in result.stdout
    # A quiet console: the engine's INFO logs are in the log file the summary names, not here.
    log = out / "teacher-cache.log"
    assert f"log  {log}" in result.stdout or str(log) in result.stdout
    assert "non-default args" in log.read_text() and "non-default args" not in result.stdout
    assert " INFO " not in result.stdout + result.stderr
    # the examples past --limit are deferred, neither accepted nor rejected
    counts = {
        k: int(v)
        for k, v in (
            line.strip().rsplit("  ", 1) for line in result.stdout.splitlines() if "  " in line
        )
        if k.strip() in ("examples read", "accepted", "rejected", "deferred")
    }
    counts = {k.strip(): v for k, v in counts.items()}
    assert counts["accepted"] + counts["rejected"] + counts["deferred"] == counts["examples read"]
    assert counts["accepted"] <= 3
    rows = shard_rows(out)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    gated = [r for r in rejects if r.get("example_id")]
    assert len(rows) + len(gated) == 3 and rows
    assert all(r["teacher_reasoning"].startswith("Emotion:") for r in rows)
    assert all(r["response_token_ids"] and r["teacher_response"].strip() for r in rows)
    check_against_transformers(embedded_teacher, rows)
    shutil.rmtree(out)


@pytest.mark.parametrize("strategy, base", [("sequential", "reference"), ("weakest", "teacher")])
def test_improve_mode_writes_preference_pairs(tiny_teacher, tmp_path, strategy, base):
    """Targeted improvement: the teacher rewrites a base reply; the improved reply is the target
    (top-k conditioned on the whole exchange) and (improved, base) is the preference pair."""
    from empathy_distill.stage1_teacher import teacher_cache

    ed = DATA / "ed_sample.csv"
    examples, reader_rejects = read_examples(ed)
    improve = {"strategy": strategy, "base": base}
    cfg = make_cfg(tiny_teacher, [ed], tmp_path / "cache", features=False, mode="improve")
    cfg.teacher_cache.improve = cfg.teacher_cache.improve.model_validate(improve)
    summary = teacher_cache.main(cfg)
    with_reference = [e for e in examples if e.reference]
    expected = with_reference if base == "reference" else examples
    assert summary["accepted"] == len(expected)
    assert summary["rejected"] == len(reader_rejects) + len(examples) - len(expected)
    rows = shard_rows(tmp_path / "cache")
    assert len(rows) == len(expected)
    refs = {e.example_id: e.reference for e in examples}
    for r in rows:
        assert r["improvement_strategy"] == strategy and r["teacher_emotion"] is None
        assert isinstance(r["base_response"], str)
        if base == "reference":
            assert r["base_response"] == refs[r["example_id"]]
    context = rows[0]["teacher_context_token_ids"]
    if strategy == "sequential":  # the last turn saw the two earlier improved replies
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(tiny_teacher).decode(context)
        assert text.count("Improved reply:") == 3 and "compassionate empathy" in text
    manifest = verify_cache(tmp_path / "cache", top_k=5)
    assert manifest["prompt_template"]["strategy"] == strategy
    check_against_transformers(tiny_teacher, [r for r in rows if r["response_token_ids"]][:3])


def test_gate_rejects_bad_replies_and_retries_reproducibly(tiny_teacher, tmp_path, monkeypatch):
    """A teacher forced to fail (4 new tokens: every reply is cut off in mid-sentence or too
    short) gives rejects with each attempt's reasons, never an empty row; a retry is a seeded
    sample, so a second run into another folder writes the same replies and the same rejects;
    a rerun starts no engine and counts the same rejects."""
    from empathy_distill.stage1_teacher import teacher_cache

    ed = DATA / "ed_sample.csv"
    n_ex, n_rej = (len(x) for x in read_examples(ed))
    runs = []
    for name in ("a", "b"):
        cfg = make_cfg(tiny_teacher, [ed], tmp_path / name, features=False, quality={"retries": 2})
        cfg.teacher.max_new_tokens = 4
        summary = teacher_cache.main(cfg)
        rows = shard_rows(tmp_path / name) if (tmp_path / name / "manifest.json").exists() else []
        rejects = [
            json.loads(x) for x in (tmp_path / name / "rejects.jsonl").read_text().split("\n") if x
        ]
        runs.append((summary, rows, rejects))
    (summary, rows, rejects), (_, rows_b, rejects_b) = runs
    gated = [r for r in rejects if r["reason"].startswith("teacher reply failed the quality gate")]
    assert len(gated) >= n_ex - 2 and len(rows) + len(gated) == n_ex
    assert summary["rejected"] == n_rej + len(gated)
    assert summary["accepted"] + summary["rejected"] == summary["examples_read"]
    assert sum(v for k, v in summary.items() if k.startswith("rejected_")) == len(gated)
    for r in gated:  # each attempt's reasons, the last attempt included
        assert "attempt 0:" in r["reason"] and "attempt 2:" in r["reason"] and r["example_id"]
        assert "mid-sentence" in r["reason"] or "too short" in r["reason"]
    for row in rows:
        assert row["response_token_ids"] and row["teacher_response"].strip()

    def key(rs: list[dict]) -> list[tuple]:
        return sorted((r["example_id"], r["teacher_response"], r["teacher_attempt"]) for r in rs)

    assert key(rows) == key(rows_b)
    assert sorted(r["reason"] for r in rejects) == sorted(r["reason"] for r in rejects_b)

    def no_engine(*args, **kwargs):
        raise AssertionError("gate rejects of an earlier run are not asked again")

    monkeypatch.setattr(teacher_cache, "start_engine", no_engine)
    cfg = make_cfg(tiny_teacher, [ed], tmp_path / "a", features=False, quality={"retries": 2})
    cfg.teacher.max_new_tokens = 4
    again = teacher_cache.main(cfg)
    assert again["rejected"] == summary["rejected"] and again["new_examples"] == 0
    assert again["already_cached"] == len(rows)


def test_a_watched_request_is_stopped_in_the_real_engine(tiny_teacher, tmp_path):
    """The engine loop streams a watched request's output from vLLM step by step and aborts it
    where its watch says: the exchange gets the tokens so far (the same tokens the unwatched
    request generates first, same seed), the engine keeps nothing running, and an exchange
    queued behind it still runs to its end."""
    from empathy_distill.stage1_teacher import teacher_cache

    cfg = make_cfg(tiny_teacher, [], tmp_path / "out", features=False)
    cfg.teacher.max_new_tokens = 40
    llm = teacher_cache.start_engine(cfg)

    class StopAt:
        def __init__(self, n: int):
            self.n, self.seen = n, []

        def __call__(self, out) -> bool:
            self.seen.append(len(out.outputs[0].token_ids))
            return self.seen[-1] >= self.n

    def exchange(watch=None):
        params = teacher_cache.generation_params(cfg, 1, "ex-1", ignore_eos=True, stop=[])
        request = ({"prompt_token_ids": [1, 2, 3, 4, 5]}, params)
        out = yield (*request, watch) if watch else request
        return out

    results: dict[str, object] = {}
    loop = teacher_cache.EngineLoop(llm)
    watch = StopAt(6)
    try:
        loop.start(exchange(watch), lambda out: results.setdefault("watched", out))
        loop.start(exchange(), lambda out: results.setdefault("full", out))
        while loop.waiting:
            loop.step()
        idle = not llm.llm_engine.has_unfinished_requests()
    finally:
        teacher_cache.stop_engine(llm)
    watched, full = results["watched"], results["full"]
    assert not watched.finished and full.finished
    stopped, whole = list(watched.outputs[0].token_ids), list(full.outputs[0].token_ids)
    assert 6 <= len(stopped) < len(whole) == 40 and stopped == whole[: len(stopped)]
    assert watch.seen == sorted(watch.seen) and len(watch.seen) >= 2  # streamed, step by step
    assert idle
