"""Benchmark stage one's scale-out: `teacher-cache` on N Ray workers against one engine, in one
script run (not a test: machines here are noisy, so the figure is a ratio of runs side by side).

    .venv/bin/python benchmarks/bench_workers.py                       # demo set, 1 vs 2 workers
    .venv/bin/python benchmarks/bench_workers.py --limit 64 --workers 2 --ray-one

Baseline: `teacher-cache` with the local backend (one engine in this process, the default) into a
fresh folder. Measured: the same with `teacher_cache.backend=ray` and `--workers` workers into
another fresh folder (`--ray-one` adds a one-worker Ray run: what Ray itself costs). Every run
uses the same `shard_size` (the unit of work; `--shard-size`, 16 by default so that the units
spread evenly over the workers). Throughput = examples answered per second of wall time, engine
start included; the steady-state figure leaves the engine start out.

On a CPU machine each worker's engine is bound to a core of its own (VLLM_CPU_OMP_THREADS_BIND,
chosen by stage1_teacher/workers.py); the baseline's engine takes vLLM's default binding.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(args, overrides: list[str]) -> dict:
    """One `teacher-cache` run in a fresh process: a run's engine changes its process's
    environment (vLLM's CPU build sets LD_PRELOAD for its engine), which must not reach the
    next run's workers."""
    cmd = [sys.executable, __file__, "--config", args.config, "--pipeline", args.pipeline]
    for o in overrides:
        cmd += ["--set", o]
    done = subprocess.run(
        [*cmd, "--one"], cwd=REPO, stdout=subprocess.PIPE, stderr=None, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "pipelines.yaml"))
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--ray-one", action="store_true", help="also time one Ray worker")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # the child: one run, its summary as the last line
        from empathy_distill.shared.config import load_config
        from empathy_distill.stage1_teacher import teacher_cache

        summary = teacher_cache.main(load_config(args.config, args.pipeline, args.overrides))
        print(json.dumps(summary))
        return

    common = [*args.overrides, f"teacher_cache.shard_size={args.shard_size}"]
    if args.limit:
        common.append(f"teacher_cache.limit={args.limit}")
    runs = {"local, 1 engine": []}
    if args.ray_one:
        runs["ray, 1 worker"] = ["teacher_cache.backend=ray", "teacher_cache.workers=1"]
    runs[f"ray, {args.workers} workers"] = [
        "teacher_cache.backend=ray",
        f"teacher_cache.workers={args.workers}",
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(runs.items()):
            s = one_run(args, [*common, *extra, f"teacher_cache.output={tmp}/cache{i}"])
            answered = s["new_examples"] + sum(v for k, v in s.items() if k.startswith("rejected_"))
            steady = s["wall_seconds"] - s["engine_startup_seconds"] / max(s["workers"], 1)
            results[name] = {
                "wall_seconds": s["wall_seconds"],
                "engine_startup_seconds": s["engine_startup_seconds"],
                "examples": answered,
                "generated_tokens": s["generated_tokens"],
                "examples_per_second": round(answered / s["wall_seconds"], 3),
                "steady_examples_per_second": round(answered / steady, 3),
                "accepted": s["new_examples"],
            }
    base = results["local, 1 engine"]
    for r in results.values():
        r["throughput_ratio"] = round(r["examples_per_second"] / base["examples_per_second"], 2)
        r["steady_ratio"] = round(
            r["steady_examples_per_second"] / base["steady_examples_per_second"], 2
        )
    keys = list(base)
    print("\n| run | " + " | ".join(k.replace("_", " ") for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(str(r[k]) for k in keys) + " |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
