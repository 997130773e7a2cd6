"""Every distillation method on one cleaned teacher cache, with the same budget and several seeds,
evaluated side by side: the evidence table (mean and spread over seeds) and its chart.

    .venv/bin/python benchmarks/ablation.py     # demo: 20 steps, 2 seeds, 16 dialogues (36 min)
    .venv/bin/python benchmarks/ablation.py --steps 40 --seeds 0 1 2 --limit 62
    .venv/bin/python benchmarks/ablation.py --pipeline ed-text --steps 2000 --limit 500   # GPUs

1. teacher-cache: the pipeline's cache (idempotent: a rerun asks the teacher nothing), and the
   held-out cache of evaluate's dialogues (`evaluate.teacher_cache`, default
   `<out>/held_out_cache`) that the teacher-fidelity figures read.
2. distill: each method (every one but sft-dpo, which needs an improve-mode cache) for `--steps`
   optimizer steps, with the pipeline's batch, learning rate and schedule, once per seed, into
   `<out>/<method>-s<seed>`. A finished run is skipped, an interrupted one resumes.
3. Xie et al.'s two steps (`--two-step`, default the `xie-two-step` pipeline; `none` skips them):
   an improve-mode cache per improvement strategy (`--strategies`, default `plain` and `all`:
   the paper's claim is the targeted prompt's gain over "improve this reply"), `sft-dpo` on each
   (`--steps` SFT steps on the improved replies, then DPO for the pipeline's dpo/sft share of
   that), and its own baseline: `sft` on the same pipeline's settings for the same total steps.
   Rows `sft-dpo-<strategy>` and `two-step-sft`.
4. evaluate: the teacher, the undistilled student and every run on the first `--limit` held-out
   dialogues, in one `pipeline evaluate` (`<out>/evaluate`: its report, replies, charts); the
   students share one engine, each run's weights swapped in (`evaluate.reuse_engine`).
5. `<out>/table.md`, `table.json`, `ablation.png`: per method, the mean over seeds and the spread
   (half the range) of each figure.

Each stage is the project's own main. Every training run is its own child process: after
`distill.main` returns, its student and optimizer state stay referenced (a chain of tuples up to
DeepSpeed's ZeRO optimizer; gc.collect() and malloc_trim free nothing), about 0.8 GB of the
demo's per run, so 22 runs in one process grew to 12 GB and were killed for memory on a 24 GB
machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import typing
from pathlib import Path

from empathy_distill.shared.config import ImproveConfig

REPO = Path(__file__).resolve().parents[1]
METHODS = ("sft", "seqkd", "kd", "pride", "pride-no-pi", "pride-no-mmd", "pride-no-rkl")
# the improve mode's strategies, as the config spells them
STRATEGIES = typing.get_args(ImproveConfig.model_fields["strategy"].annotation)
# (key in metrics.json's model entry, label, higher is better)
FIGURES = (
    ("teacher_fidelity.kl_teacher_student", "KL(teacher‖model)", False),
    ("teacher_fidelity.kl_student_teacher", "KL(model‖teacher)", False),
    ("teacher_fidelity.reply_logprob", "teacher reply log-prob", True),
    ("teacher_fidelity.bertscore_f1_vs_teacher", "BERTScore vs teacher", True),
    ("bertscore_f1", "BERTScore vs reference", True),
    ("distinct_2", "Distinct-2", True),
    ("gate.passed", "passes the gate", True),
    ("emotion_accuracy", "emotion acc.", True),
    ("emotion_macro_f1", "emotion macro-F1", True),
    ("judge_vs_baseline.debiased_win_rate", "judge: debiased win vs student", True),
)


def _distill(job) -> None:
    """A child process's work: one training run; a PipelineError is one line and exit code 1."""
    import sys

    from empathy_distill.shared.errors import PipelineError
    from empathy_distill.stage2_distill import distill

    try:
        distill.main(job)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def distill_apart(job) -> None:
    """`distill.main(job)` in a fresh (spawned) process, so its memory goes back when it ends."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_distill, args=(job,))
    child.start()
    child.join()
    if child.exitcode:
        raise SystemExit(
            f"distill into {job.distill.output} failed (exit code {child.exitcode}): see above; "
            "rerun the same command to resume"
        )


def figure(entry: dict, key: str) -> float | None:
    for part in key.split("."):
        entry = entry.get(part) if isinstance(entry, dict) else None
    return entry if isinstance(entry, int | float) else None


def aggregate(models: dict[str, dict], runs: dict[str, list[str]]) -> dict[str, dict]:
    """Per method (and the two reference models): the mean and half-range of each figure over
    its seeds' entries in metrics.json."""
    table = {}
    for method, names in runs.items():
        row = {}
        for key, _, _ in FIGURES:
            values = [v for n in names if (v := figure(models[n], key)) is not None]
            row[key] = (
                {
                    "mean": statistics.fmean(values),
                    "spread": (max(values) - min(values)) / 2,
                    "n": len(values),
                }
                if values
                else None
            )
        table[method] = row
    return table


def markdown(table: dict[str, dict], note: str) -> str:
    def cell(v: dict | None) -> str:
        if v is None:
            return "n/a"
        return f"{v['mean']:.3f} ± {v['spread']:.3f}" if v["n"] > 1 else f"{v['mean']:.3f}"

    head = "| model | " + " | ".join(label for _, label, _ in FIGURES) + " |"
    rule = "|---" * (len(FIGURES) + 1) + "|"
    rows = [
        f"| **{m}** | " + " | ".join(cell(r[k]) for k, _, _ in FIGURES) + " |"
        for m, r in table.items()
    ]
    return "\n".join([head, rule, *rows, "", note]) + "\n"


def chart(table: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [f for f in FIGURES if any(r[f[0]] for r in table.values())]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 0.35 * len(table) + 1.6))
    names = list(table)
    for ax, (key, label, higher) in zip(axes, shown, strict=True):
        cells = [table[m][key] for m in names]
        means = [c["mean"] if c else 0.0 for c in cells]
        errors = [c["spread"] if c else 0.0 for c in cells]
        ax.barh(names, means, xerr=errors, color="tab:blue", capsize=2)
        ax.invert_yaxis()
        ax.set_title(f"{label}\n({'higher' if higher else 'lower'} is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax is not axes[0]:
            ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "pipelines.yaml"))
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--out", default=None, help="default: runs/<pipeline>-ablation")
    # 20 steps and 16 dialogues: the whole table (22 runs) in 36 minutes on the 2-core CPU
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--limit", type=int, default=16, help="held-out dialogues evaluated")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--two-step",
        default="xie-two-step",
        help="the improve-mode pipeline for sft-dpo; none: skip",
    )
    parser.add_argument("--strategies", nargs="+", default=["plain", "all"], choices=STRATEGIES)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from empathy_distill.evaluation import evaluate
    from empathy_distill.shared import console
    from empathy_distill.shared.config import held_out_cache_config, load_config
    from empathy_distill.stage1_teacher import teacher_cache
    from empathy_distill.stage2_distill import distill

    out = Path(args.out or REPO / "runs" / f"{args.pipeline}-ablation").resolve()
    cfg = load_config(args.config, args.pipeline, args.overrides)
    # read before any work: a mistyped --two-step fails now, not after the methods' training
    xie = (
        load_config(args.config, args.two_step, args.overrides) if args.two_step != "none" else None
    )
    cfg.evaluate.limit = args.limit
    # the pipeline's held-out cache when it names one (`pipeline run` made it), else our own
    cfg.evaluate.teacher_cache = cfg.evaluate.teacher_cache or out / "held_out_cache"
    seconds: dict[str, float] = {}

    t0 = time.time()
    cache = teacher_cache.main(cfg)
    held = teacher_cache.main(held_out_cache_config(cfg))
    seconds["teacher-cache"] = round(time.time() - t0, 1)
    console.say(f"caches: {cache['rows']} training rows, {held['rows']} held-out rows")

    runs: dict[str, list[str]] = {"teacher": ["teacher"], "student": ["student"]}
    models = ["teacher", "student"]

    def train(row: str, job, method: str, steps: int) -> None:
        """`method` for `steps` optimizer steps, once per seed: the runs of table row `row`."""
        for seed in args.seeds:
            run = job.model_copy(deep=True)
            name = f"{row}-s{seed}"
            run.distill.method, run.distill.seed = method, seed
            run.distill.max_steps = steps
            run.distill.checkpoint_every = steps  # one checkpoint, at the end
            run.distill.output = out / name
            if not distill.is_done(run):
                console.say(f"distill {name}: {steps} steps")
                distill_apart(run)
            runs.setdefault(row, []).append(name)
            models.append(f"{name}={run.distill.output / 'final'}")

    t0 = time.time()
    for method in args.methods:
        train(method, cfg, method, args.steps)
    seconds["distill"] = round(time.time() - t0, 1)

    if xie is not None:
        t0 = time.time()
        # the pair's second step for the pipeline's share of the first (60 + 40: 20 -> 13)
        dpo = max(1, round(args.steps * xie.distill.dpo_steps / max(xie.distill.sft_steps, 1)))
        for strategy in args.strategies:
            job = xie.model_copy(deep=True)
            job.teacher_cache.improve.strategy = strategy
            job.teacher_cache.output = job.distill.shards = out / f"two-step-{strategy}" / "cache"
            pairs = teacher_cache.main(job)
            console.say(f"improve cache ({strategy}): {pairs['rows']} preference pairs")
            job.distill.sft_steps, job.distill.dpo_steps = args.steps, dpo
            train(f"sft-dpo-{strategy}", job, "sft-dpo", args.steps + dpo)
        # its own baseline: sft with the pipeline's settings for the same steps, on the human
        # replies of the last cache's rows (every strategy's cache holds the same examples)
        train("two-step-sft", job, "sft", args.steps + dpo)
        seconds["two-step"] = round(time.time() - t0, 1)

    t0 = time.time()
    ev = cfg.model_copy(deep=True)
    ev.evaluate.models, ev.evaluate.baseline = models, "student"
    ev.evaluate.output = out / "evaluate"
    evaluate.main(ev)
    seconds["evaluate"] = round(time.time() - t0, 1)

    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    table = aggregate(metrics["models"], runs)
    note = (
        f"{args.pipeline}: {cache['rows']} cached training rows; {args.steps} optimizer steps per "
        f"run (micro-batch {cfg.distill.micro_batch_size}, lr {cfg.distill.lr})"
        + (
            f"; {args.two_step}: sft-dpo {args.steps} SFT + {dpo} DPO steps per strategy, "
            f"two-step-sft {args.steps + dpo} steps (micro-batch "
            f"{xie.distill.micro_batch_size}, lr {xie.distill.lr})"
            if xie is not None
            else ""
        )
        + f"; seeds "
        f"{', '.join(map(str, args.seeds))}: mean ± half the range over seeds. Evaluated on "
        f"{metrics['examples']} held-out dialogues; teacher fidelity over {held['rows']} held-out "
        f"teacher replies. Seconds: {json.dumps(seconds)}."
    )
    (out / "table.md").write_text(markdown(table, note), encoding="utf-8")
    (out / "table.json").write_text(
        json.dumps({"table": table, "note": note, "seconds": seconds}, indent=2) + "\n"
    )
    chart(table, out / "ablation.png")
    print(markdown(table, note))


if __name__ == "__main__":
    from empathy_distill.shared.errors import PipelineError

    try:
        main()
    except PipelineError as e:  # bad config, unreadable input, mismatched cache: one line
        raise SystemExit(f"error: {e}") from None
