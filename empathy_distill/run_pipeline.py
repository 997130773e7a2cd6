"""`pipeline run`: a whole named pipeline, teacher-cache -> distill -> evaluate, in one process.

    pipeline run --pipeline demo
    pipeline run --pipeline xie-two-step --set distill.dpo_steps=20

Each stage is skipped when its output is complete, so a rerun (or a run after a crash) does only
what is missing:
- teacher-cache always runs its main: it is idempotent and starts no engine when every example is
  cached ("skipped" in the table when it made no new shard); with `evaluate.teacher_cache` set,
  it then caches the held-out dialogues there too (`held_out_cache_config`), for evaluate's
  teacher-fidelity figures;
- distill, once for the pipeline's method and once per `run.baselines` method (into
  `<distill.output>-<method>`), is skipped when `stage2_distill.distill.is_done` says a rerun would
  train nothing; otherwise it resumes from its checkpoint;
- evaluate compares the teacher, the undistilled student and every trained student (the models
  of `evaluate.models`, plus `<method>=<distill.output>/final` and each baseline's final/). It is
  skipped when its output has a metrics.json made from the same resolved config (the `run`
  section aside), newer than every student it compares; a distill that trained in this run
  always makes it rerun.

The stages never import each other; this module is the only place that calls all three. A table
of the stages (status and seconds) is printed and written to `<distill.output>/../run_summary.json`,
with each stage's own summary (teacher-cache's generation and feature seconds, distill's losses...).
Several distill ranks (torchrun) are not for this command: run the stages one by one then.
Distill's one-process group stays joined when evaluate starts vLLM in the same process (DeepSpeed
cannot join a second group after leaving one; the engine tests run after distill's in CI too).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from empathy_distill.shared.config import STAGES, PipelineConfig, held_out_cache_config
from empathy_distill.shared.files import atomic_write_text


def distill_jobs(cfg: PipelineConfig) -> list[tuple[str, PipelineConfig]]:
    """(method, config) of the pipeline's student, then of each baseline, in its own folder."""
    jobs = [(cfg.distill.method, cfg)]
    for method in cfg.run.baselines:
        if method == cfg.distill.method:
            continue
        job = cfg.model_copy(deep=True)
        job.distill.method = method
        job.distill.output = Path(f"{cfg.distill.output}-{method}")
        jobs.append((method, job))
    return jobs


def evaluate_config(cfg: PipelineConfig) -> PipelineConfig:
    """`evaluate.models` plus every student this pipeline trains (names not already taken)."""
    from empathy_distill.shared.config import split_model_spec

    ev = cfg.model_copy(deep=True)
    names = {split_model_spec(m)[0] for m in ev.evaluate.models}
    extra = [
        f"{method}={job.distill.output / 'final'}"
        for method, job in distill_jobs(cfg)
        if method not in names
    ]
    ev.evaluate.models = [*ev.evaluate.models, *extra]
    return ev


def evaluate_is_done(cfg: PipelineConfig) -> bool:
    """metrics.json from this very resolved config, newer than the trained students it read."""
    out = cfg.evaluate.output
    metrics, resolved = out / "metrics.json", out / "resolved_config.yaml"
    if not (metrics.is_file() and resolved.is_file()):
        return False
    # The `run` section (which stages, baselines) does not change what evaluate computes.
    made_from = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
    made_from.pop("run", None)
    if made_from != cfg.model_dump(mode="json", exclude={"run"}):
        return False
    made = metrics.stat().st_mtime
    students = [job.distill.output / "final" for _, job in distill_jobs(cfg)]
    files = [p for folder in students if folder.is_dir() for p in folder.iterdir()]
    newest = max((p.stat().st_mtime for p in files), default=0.0)
    return made >= resolved.stat().st_mtime and made >= newest


def main(cfg: PipelineConfig) -> dict[str, Any]:
    from empathy_distill.evaluation import evaluate
    from empathy_distill.stage1_teacher import teacher_cache
    from empathy_distill.stage2_distill import distill

    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}  # each stage's own summary, as its command would print it
    trained, current, t0 = False, "", time.time()
    summary_path = cfg.distill.output.parent / "run_summary.json"

    def record(stage: str, status: str, t0: float) -> None:
        rows.append({"stage": stage, "status": status, "seconds": round(time.time() - t0, 1)})

    try:
        for stage in (s for s in STAGES if s in cfg.run.stages):
            current = stage
            if stage == "teacher-cache":
                t0 = time.time()
                details[stage] = teacher_cache.main(cfg)
                made = details[stage]["new_shards"]
                record(stage, f"ran ({made} new shards)" if made else "skipped (all cached)", t0)
                if cfg.evaluate.teacher_cache is not None:
                    current, t0 = "teacher-cache held-out", time.time()
                    details[current] = teacher_cache.main(held_out_cache_config(cfg))
                    made = details[current]["new_shards"]
                    status = f"ran ({made} new shards)" if made else "skipped (all cached)"
                    record(current, status, t0)
            elif stage == "distill":
                for method, job in distill_jobs(cfg):
                    current, t0 = f"distill {method}", time.time()
                    if distill.is_done(job):
                        record(f"distill {method}", "skipped (done)", t0)
                        continue
                    result = details[f"distill {method}"] = distill.main(job)
                    trained = True
                    record(f"distill {method}", f"ran (steps {result['steps']})", t0)
            else:
                t0 = time.time()
                ev = evaluate_config(cfg)
                if not trained and evaluate_is_done(ev):
                    record(stage, "skipped (report up to date)", t0)
                else:
                    details[stage] = evaluate.main(ev)
                    record(stage, "ran", t0)
    except BaseException as e:
        failed = f"failed ({type(e).__name__})"
        rows.append({"stage": current, "status": failed, "seconds": round(time.time() - t0, 1)})
        raise
    finally:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"pipeline": cfg.name, "stages": rows, "details": details}
        atomic_write_text(summary_path, json.dumps(doc, indent=2, default=str) + "\n")
    return {"pipeline": cfg.name, "stages": rows, "summary": str(summary_path)}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The per-stage table `pipeline run` prints at the end."""
    lines = [
        ("stage", "status", "seconds"),
        *((r["stage"], r["status"], r["seconds"]) for r in rows),
    ]
    w0 = max(len(str(a)) for a, _, _ in lines)
    w1 = max(len(str(b)) for _, b, _ in lines)
    return "\n".join(f"  {a!s:<{w0}}  {b!s:<{w1}}  {c!s:>7}" for a, b, c in lines)
