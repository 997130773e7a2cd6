"""`pipeline run`: stages in order, complete ones skipped. Distill is the real one (tiny student,
synthetic cache); teacher-cache and evaluate are stand-ins that record their calls (they need
vLLM engines, which their own engine tests start)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO, make_cache

from empathy_distill.shared.config import load_config, write_resolved


@pytest.fixture
def pipeline(tmp_path, tiny_student, monkeypatch):
    """A config whose cache is synthetic, and a log of the stage calls."""
    from empathy_distill.evaluation import evaluate
    from empathy_distill.shared.models import load_tokenizer
    from empathy_distill.stage1_teacher import teacher_cache
    from empathy_distill.stage2_distill import distill

    cache = tmp_path / "cache"
    make_cache(cache, load_tokenizer(tiny_student), shards=1)
    doc = {
        "student": {"model": str(tiny_student)},
        "teacher_cache": {"output": str(cache)},
        "distill": {
            "shards": str(cache),
            "output": str(tmp_path / "runs" / "student"),
            "deepspeed": str(REPO / "configs" / "zero2.json"),
            "max_steps": 2,
            "micro_batch_size": 2,
            "shuffle_buffer": 4,
            "privileged_max_tokens": 16,
        },
        "evaluate": {"output": str(tmp_path / "runs" / "evaluate")},
        "run": {"baselines": ["sft"]},
    }
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"t": doc}}))
    calls: list[tuple[str, object]] = []

    def fake_teacher_cache(cfg):
        held_out = cfg.teacher_cache.output != cache
        calls.append(("teacher-cache", cfg.teacher_cache if held_out else None))
        return {"new_shards": 0}

    real_distill = distill.main

    def counted_distill(cfg):
        calls.append(("distill", cfg.distill.method))
        return real_distill(cfg)

    def fake_evaluate(cfg):
        calls.append(("evaluate", list(cfg.evaluate.models)))
        write_resolved(cfg, cfg.evaluate.output)
        (cfg.evaluate.output / "metrics.json").write_text("{}")
        return {}

    monkeypatch.setattr(teacher_cache, "main", fake_teacher_cache)
    monkeypatch.setattr(distill, "main", counted_distill)
    monkeypatch.setattr(evaluate, "main", fake_evaluate)
    return path, cache, calls


def statuses(summary) -> dict[str, str]:
    return {row["stage"]: row["status"].split(" ")[0] for row in summary["stages"]}


def test_run_skips_complete_stages(tmp_path, tiny_student, pipeline):
    from empathy_distill import run_pipeline
    from empathy_distill.shared.models import load_tokenizer

    path, cache, calls = pipeline
    run = lambda *sets: run_pipeline.main(load_config(path, "t", list(sets)))  # noqa: E731

    summary = run()
    out = tmp_path / "runs" / "student"
    assert [c[0] for c in calls] == ["teacher-cache", "distill", "distill", "evaluate"]
    assert [c[1] for c in calls[1:3]] == ["pride", "sft"]
    assert calls[3][1] == ["teacher", "student", f"pride={out}/final", f"sft={out}-sft/final"]
    assert statuses(summary) == {
        "teacher-cache": "skipped",
        "distill pride": "ran",
        "distill sft": "ran",
        "evaluate": "ran",
    }
    assert (out.parent / "run_summary.json").exists()
    written = json.loads((out.parent / "run_summary.json").read_text())
    assert written["stages"] == summary["stages"]
    # each stage's own summary rides along (the real distill's steps among them)
    assert written["details"]["teacher-cache"] == {"new_shards": 0}
    assert written["details"]["distill pride"]["steps"] == "0 -> 2 (of 2)"

    calls.clear()  # everything complete: only the idempotent teacher-cache is called
    summary = run()
    assert calls == [("teacher-cache", None)]
    assert set(statuses(summary).values()) == {"skipped"}

    calls.clear()  # the run section alone does not change the report
    run("run.stages=[distill,evaluate]")
    assert calls == []

    calls.clear()  # another evaluate config: only evaluate reruns
    run("evaluate.limit=3")
    assert [c[0] for c in calls] == ["teacher-cache", "evaluate"]

    calls.clear()  # the cache grew: both students train on the new rows, the report is redone
    make_cache(cache, load_tokenizer(tiny_student), shards=1, rows=4)
    summary = run("evaluate.limit=3")
    assert [c[0] for c in calls] == ["teacher-cache", "distill", "distill", "evaluate"]
    assert statuses(summary)["distill pride"] == "ran"


def test_run_caches_the_held_out_dialogues_for_evaluate(tmp_path, pipeline):
    from empathy_distill import run_pipeline

    path, cache, calls = pipeline
    held = tmp_path / "held"
    sets = [f"evaluate.teacher_cache={held}", "evaluate.inputs=[data/demo/test.csv]"]
    summary = run_pipeline.main(load_config(path, "t", [*sets, "run.stages=[teacher-cache]"]))
    assert [c[0] for c in calls] == ["teacher-cache", "teacher-cache"]
    tc = calls[1][1]  # the teacher over evaluate's inputs, into evaluate.teacher_cache
    assert tc.output == held and [p.name for p in tc.inputs] == ["test.csv"]
    assert tc.mode == "answer" and not tc.features
    assert statuses(summary) == {"teacher-cache": "skipped", "teacher-cache held-out": "skipped"}


def test_run_stops_at_a_failing_stage_and_says_where(tmp_path, pipeline, monkeypatch):
    from empathy_distill import run_pipeline
    from empathy_distill.shared.errors import PipelineError
    from empathy_distill.stage1_teacher import teacher_cache

    path, _, calls = pipeline

    def broken(cfg):
        raise PipelineError("no input")

    monkeypatch.setattr(teacher_cache, "main", broken)
    with pytest.raises(PipelineError, match="no input"):
        run_pipeline.main(load_config(path, "t"))
    assert calls == []
    written = json.loads((tmp_path / "runs" / "run_summary.json").read_text())
    assert written["stages"] == [
        {"stage": "teacher-cache", "status": "failed (PipelineError)", "seconds": 0.0}
    ]


def test_baselines_must_be_methods(tmp_path):
    from empathy_distill.shared.errors import PipelineError

    with pytest.raises(PipelineError, match="run.baselines"):
        load_config(REPO / "pipelines.yaml", "demo", ["run.baselines=[bogus]"])
