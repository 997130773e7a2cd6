"""Stage two: stream teacher shards into DeepSpeed training of the student, then export it.

    pipeline distill --pipeline demo                            # one process (CPU or one GPU)
    torchrun --nproc_per_node 2 -m empathy_distill.stage2_distill.distill --pipeline demo
    deepspeed --num_gpus 8 --module empathy_distill.stage2_distill.distill --pipeline ed-text

Reads `distill.shards` (a teacher cache), writes to `distill.output`: resolved_config.yaml,
checkpoints/, metrics.jsonl, tensorboard/, loss.png, summary.json and final/ (the student as a
plain Hugging Face folder). Rerunning on the same output resumes from the last checkpoint,
stream position included; shards the cache gained since then are trained on next (the step
budget grows to cover them once); `distill.fresh=true` (`--fresh`) starts over.
`distill.method: sft-dpo` (Xie et al.'s SFT then DPO) is laid out in stage2_distill/two_step.py.

main() reads as four phases: prepare (the cache contract, the process group, where to resume, the
step budget) -> build (student, DeepSpeed engine, stream) -> train (the loop; each method's step
function comes from METHODS) -> finish (export, plot, summary).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # the central objects, named for readers and the type checker only
    from deepspeed import DeepSpeedEngine

    from empathy_distill.stage2_distill.student import Student

from empathy_distill.shared import console
from empathy_distill.shared.config import (
    LossWeights,
    PipelineConfig,
    load_config,
    open_output,
    write_resolved,
)
from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.files import atomic_write_text, file_sha256
from empathy_distill.shared.models import check_model, load_tokenizer, tokenizer_fingerprint
from empathy_distill.shared.schema import check_pairs, verify_cache
from empathy_distill.stage2_distill import losses, two_step
from empathy_distill.stage2_distill.batch import collate, encode_row, usable
from empathy_distill.stage2_distill.stream import ShardStream, check_shards

MODEL_INPUTS = ("input_ids", "attention_mask", "pred_rows", "pred_cols")
FEATURE_INPUTS = ("feat_rows", "feat_cols", "feat_index")

# ----------------------------------------------------------------------------- helpers


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group; without a launcher, be rank 0 of 1 (DeepSpeed reads
    the launcher's variables, so they are set for this run: `main` takes them back)."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port, so two single-process runs can coexist
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        one = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        one["MASTER_PORT"] = str(port)
        for name, value in one.items():
            if name not in os.environ:
                os.environ[name] = value
                _LAUNCHER_ENV.add(name)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


_LAUNCHER_ENV: set[str] = set()  # the launcher variables init_distributed set for one process


def deepspeed_config(cfg: PipelineConfig, world_size: int, cuda: bool) -> dict[str, Any]:
    """The ZeRO file as given, with the batch, learning rate and precision from the config."""
    d = cfg.distill
    try:
        ds = json.loads(d.deepspeed.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PipelineError(f"distill.deepspeed: cannot read {d.deepspeed} ({e})") from None
    ds["train_micro_batch_size_per_gpu"] = d.micro_batch_size
    ds["gradient_accumulation_steps"] = d.grad_accum
    ds["train_batch_size"] = d.micro_batch_size * d.grad_accum * world_size
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params.update(lr=d.lr, weight_decay=d.weight_decay)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer")
    if not cuda:
        params["torch_adam"] = True  # DeepSpeed's FusedAdam is CUDA-only
    elif not offload and optimizer["type"].lower() in ("adam", "adamw"):
        # torch's fused AdamW: one CUDA kernel like DeepSpeed's FusedAdam, but nothing to
        # compile (FusedAdam is built at first use, which needs nvcc and ninja on the machine).
        # A config that sets torch_adam=false gets FusedAdam; an offloaded optimizer is left to
        # DeepSpeed (its CPU Adam).
        params.setdefault("torch_adam", True)
        if params["torch_adam"]:
            params.setdefault("fused", True)
    ds["bf16"] = {"enabled": cuda}  # fp32 on the CPU: bf16 matmuls there are slow and lossy
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if cuda and d.grad_accum > 1 and stage > 0:
        # Sum micro-batch gradients in fp32, not in bf16. DeepSpeed has no such mix without
        # ZeRO ("unsupported mix of model_dtype and grad_accum_dtype"): ZeRO-0 under bf16 keeps
        # bf16 weights and gradients throughout, ZeRO-1 is the fp32 alternative on one GPU.
        ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    return ds


def warmup_cosine(d, total_steps: int):
    """Linear warm-up from lr/warmup to lr, then cosine down to min_lr_ratio * lr at total_steps."""

    def factor(step: int) -> float:
        if step < d.warmup_steps:
            return (step + 1) / d.warmup_steps
        progress = min(1.0, (step - d.warmup_steps) / max(1, total_steps - d.warmup_steps))
        return d.min_lr_ratio + (1 - d.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def read_resume(ckpt_dir: Path, rank: int, world_size: int, method: str) -> dict[str, Any] | None:
    """This rank's saved run state from the checkpoint `latest` names, or None to start fresh."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not re.fullmatch(r"step\d{7}", tag):  # `latest` names a folder of this run, no other
        raise PipelineError(f"{latest} names {tag[:40]!r}, not a checkpoint; use --fresh")
    path = ckpt_dir / tag / f"run_state_rank{rank}.json"
    if not path.is_file():
        raise PipelineError(f"{path} is missing: checkpoint {tag} is incomplete; use --fresh")
    verify_checkpoint(ckpt_dir / tag)  # before anything in it is read
    state = json.loads(path.read_text(encoding="utf-8"))
    if state["world_size"] != world_size or state["method"] != method:
        raise PipelineError(
            f"{ckpt_dir} holds a {state['method']!r} run on {state['world_size']} rank(s), this "
            f"is {method!r} on {world_size}: resume with the same settings, or use --fresh or "
            "another output"
        )
    return {**state, "tag": tag}


def is_done(cfg: PipelineConfig) -> bool:
    """Would rerunning train nothing? True when `distill.output` holds final/ and summary.json
    written after a last checkpoint of this method at its full step count that had read every
    shard the cache lists now (a new shard means more training). `pipeline run` skips on it."""
    d = cfg.distill
    latest = d.output / "checkpoints" / "latest"
    final, summary = d.output / "final" / "config.json", d.output / "summary.json"
    if d.fresh or not (latest.is_file() and final.is_file() and summary.is_file()):
        return False
    try:
        state_path = latest.parent / latest.read_text().strip() / "run_state_rank0.json"
        state = json.loads(state_path.read_text(encoding="utf-8"))
        manifest = json.loads((d.shards / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # let main() say what is wrong
    want = d.sft_steps + d.dpo_steps if d.method == "sft-dpo" else d.max_steps
    return (
        state["method"] == d.method
        and state["step"] == state["total_steps"] >= want
        and {s["file"] for s in manifest["shards"]} <= set(state["stream"]["known"])
        and summary.stat().st_mtime >= final.stat().st_mtime
    )


def compute_losses(
    out: dict, batch: dict, terms: tuple[str, ...], w: LossWeights, temperature: float
):
    """Every term of the method (0 where the batch has nothing for it) and their weighted sum."""
    logits = out["logits"]
    zero = logits.sum() * 0.0  # keeps the graph, so a term with nothing to count still backprops
    every = torch.ones_like(batch["targets"], dtype=torch.bool)
    values: dict[str, torch.Tensor] = {}
    if "ce" in terms:
        values["ce"] = losses.cross_entropy(logits, batch["targets"], every)
    for name, fn in (("rkl", losses.reverse_kl_topk), ("fkl", losses.forward_kl_topk)):
        if name in terms:
            args = (logits, batch["topk_ids"], batch["topk_lps"], batch["kl_mask"], temperature)
            values[name] = fn(*args) if batch["kl_mask"].any() else zero
    if "mmd" in terms:
        feats, teacher = out["features"], batch["teacher_features"]
        if feats is None:
            values["mmd"] = zero
        elif teacher is None:  # no row of this micro-batch has features: 0, but through the
            values["mmd"] = feats.sum() * 0.0  # projection, so every rank reduces its gradients
        else:
            values["mmd"] = losses.mmd(feats, teacher)
    kl = values.get("rkl", values.get("fkl", zero))
    values["loss"] = w.ce * values.get("ce", zero) + w.kl * kl + w.mmd * values.get("mmd", zero)
    return values


def log_step(record: dict, metrics, writer, bar) -> None:
    """Rank 0: one JSON line, TensorBoard scalars, the progress bar."""
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    for key, value in record.items():
        if key != "step":
            writer.add_scalar(f"train/{key}", value, record["step"])
    bar.set_postfix({k: f"{record[k]:.3f}" for k in record if k not in ("step", "lr", "seconds")})
    bar.update(1)


def save_checkpoint(
    engine: DeepSpeedEngine, ckpt_dir: Path, step: int, run_state: dict, rank: int, keep: int
) -> None:
    """Each rank's stream position first, then DeepSpeed's files, then (rank 0) the checksum of
    every file, and `latest` last: a checkpoint `latest` names is complete and summed, and a
    resume loads nothing that differs from what was written (`verify_checkpoint`). Older
    checkpoints beyond `keep` are deleted."""
    tag = f"step{step:07d}"
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    atomic_write_text(ckpt_dir / tag / f"run_state_rank{rank}.json", json.dumps(run_state))
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    dist.barrier()
    if rank == 0:
        files = sorted(p for p in (ckpt_dir / tag).rglob("*") if p.is_file())
        sums = {str(p.relative_to(ckpt_dir / tag)): file_sha256(p) for p in files}
        atomic_write_text(ckpt_dir / tag / CHECKSUMS, json.dumps(sums, indent=1))
        atomic_write_text(ckpt_dir / "latest", tag)
        for old in sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


CHECKSUMS = "checksums.json"


def verify_checkpoint(folder: Path) -> None:
    """Refuse a checkpoint whose files differ from the checksums written with it, or that holds a
    file written after it, before DeepSpeed reads anything (`safe_checkpoint_engine` then keeps
    what it reads to tensors and plain data); see the README's trust note."""
    fresh = "; use --fresh (or delete it) to start over"
    try:
        sums = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        sums = None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise PipelineError(f"checkpoint {folder} has no readable {CHECKSUMS}{fresh}")
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {CHECKSUMS}
    extra = sorted(files - set(sums))
    if extra:
        raise PipelineError(f"checkpoint {folder} holds {extra[0]}, written after it{fresh}")
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            raise PipelineError(f"checkpoint {folder} is damaged: {name} differs or is gone{fresh}")


def checkpoint_globals() -> list:
    """The classes DeepSpeed 0.19.8 pickles into a checkpoint besides tensors and plain
    containers, found with `torch.serialization.get_unsafe_globals_in_checkpoint` on each ZeRO
    stage's files: the ZeRO optimizer states hold the loss scaler (the dynamic one under fp16),
    the ZeRO stage enum and fragment addresses. Nothing else is rebuilt on a resume."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        loss_scaler.LossScaler,
        loss_scaler.DynamicLossScaler,
        ZeroStageEnum,
        fragment_address,
    ]


def safe_checkpoint_engine(engine: DeepSpeedEngine) -> None:
    """Make `engine.load_checkpoint` unpickle with `torch.load(weights_only=True)`: DeepSpeed's
    own TorchCheckpointEngine hard-codes `weights_only=False`, which runs code from a pickle.
    Only the classes of `checkpoint_globals` may be rebuilt; a file that needs anything else is
    refused in one line. A DeepSpeed config that selects another checkpoint engine (Nebula,
    FastPersist) keeps it, and then only the checksums guard the resume."""
    import pickle

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ckpt = engine.checkpoint_engine
    if type(ckpt) is not TorchCheckpointEngine:
        return
    allowed = checkpoint_globals()

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is a page of advice; the global it refused is what a user needs
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = found.group(1) if found else "an object torch cannot load safely"
            raise PipelineError(
                f"checkpoint file {path} holds {what}, which is neither tensors nor plain data, "
                "so it was not unpickled (a resume loads with weights_only=True); use --fresh "
                "to start over"
            ) from None

    ckpt.load = load


def plot_losses(metrics_path: Path, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = dict.fromkeys(k for r in rows for k in r if k not in ("step", "lr", "seconds"))
    for key in keys:  # sft-dpo logs other terms in each of its two steps
        have = [r for r in rows if key in r]
        ax.plot([r["step"] for r in have], [r[key] for r in have], label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- methods


def distill_values(run: Run, rows: list[dict], step: int) -> dict[str, torch.Tensor]:
    """One micro-batch of a distillation method (pride and its ablations, sft, seqkd, kd)."""
    method, d = run.plan.method, run.cfg.distill
    batch = run.make_batch(rows, [method.target])
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    if run.model.proj is not None:
        inputs.update({k: batch[k] for k in FEATURE_INPUTS})
    if run.model.msa is not None:
        inputs["privileged"] = batch["privileged"]
    return compute_losses(run.engine(**inputs), batch, method.terms, d.weights, d.temperature)


@dataclass(frozen=True)
class Method:
    """How one `distill.method` trains. `values` gives one micro-batch's loss terms (and
    "loss", the one backpropagated); `boundary(run, step)`, after an optimizer step (and before
    the first one of a fresh run), returns True to force a checkpoint there; `phase(d, step)` is
    what the run state records for the step the next optimizer step is in."""

    terms: tuple[str, ...]  # the loss terms logged (compute_losses' names)
    privileged: bool  # multi-source attention over the privileged text
    target: str  # what the CE target is (batch.encode_row's `target`)
    values: Callable[..., dict[str, torch.Tensor]] = distill_values
    boundary: Callable[..., bool] | None = None
    phase: Callable[..., str] = lambda d, step: "train"


METHODS: dict[str, Method] = {
    "pride": Method(("ce", "rkl", "mmd"), True, "teacher"),
    "pride-no-pi": Method(("ce", "rkl", "mmd"), False, "teacher"),
    "pride-no-mmd": Method(("ce", "rkl"), True, "teacher"),
    "pride-no-rkl": Method(("ce", "mmd"), True, "teacher"),
    "sft": Method(("ce",), False, "reference"),
    "seqkd": Method(("ce",), False, "teacher"),
    "kd": Method(("ce", "fkl"), False, "teacher"),
    "sft-dpo": Method(
        ("ce",),
        False,
        "pair",
        values=two_step.values,
        boundary=two_step.boundary,
        phase=lambda d, step: two_step.phase(d.sft_steps, step),
    ),
}


# ----------------------------------------------------------------------------- phases


@dataclass
class Plan:
    """What prepare() settled: the cache's contract, this process's rank, where to resume."""

    method: Method
    student_dir: Path
    tokenizer: Any
    manifest: dict
    rank: int
    world: int
    cuda: bool
    resume: dict[str, Any] | None
    step: int  # the optimizer steps already done
    total_steps: int
    new_shards: list[dict]  # shards the cache gained since the checkpoint
    per_step: int  # rows per optimizer step, over all ranks


@dataclass
class Run:
    """What build() made for train(): the engine, the stream and how rows become batches."""

    cfg: PipelineConfig
    plan: Plan
    model: Student  # inside the engine
    engine: DeepSpeedEngine
    stream: ShardStream
    make_batch: Callable[[list[dict], list[str]], dict]
    reference: Any = None  # sft-dpo: the frozen step-one model, once step two begins

    @property
    def out(self) -> Path:
        return self.cfg.distill.output


def prepare(cfg: PipelineConfig) -> Plan:
    """The contract before anything heavy (the cache must fit the student's tokenizer), then
    the process group, a --fresh clean-up, the checkpoint to resume from and the step budget."""
    d = cfg.distill
    method = METHODS[d.method]
    two = d.method == "sft-dpo"
    open_output(d.output, "distill.output")  # on every rank, before any heavy work
    student_dir = check_model(cfg.student.model)
    tokenizer = load_tokenizer(student_dir)
    manifest = verify_cache(
        d.shards,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer),
        top_k=d.expect_top_k,
    )
    check_shards(d.shards, manifest)
    if not manifest["shards"]:
        raise PipelineError(f"{d.shards}: the cache has no shards; run `pipeline teacher-cache`")
    if two:
        check_pairs(d.shards, manifest)
    if "mmd" in method.terms and not manifest["settings"].get("feature_dim"):
        # The cache was built with features off.
        method = replace(method, terms=tuple(t for t in method.terms if t != "mmd"))
        console.say(f"note: {d.shards} has no teacher features; training {d.method} without MMD")

    rank, world = init_distributed()
    out, ckpt_dir = d.output, d.output / "checkpoints"
    if d.fresh and rank == 0:
        names = ("checkpoints", "tensorboard", "final", two_step.REFERENCE, "metrics.jsonl")
        for name in (*names, "summary.json"):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    dist.barrier()
    resume = read_resume(ckpt_dir, rank, world, d.method)
    step = resume["step"] if resume else 0
    known = set(resume["stream"]["known"]) if resume else set()
    gone = sorted(known - {s["file"] for s in manifest["shards"]})
    if gone:
        raise PipelineError(
            f"{d.shards} no longer lists {', '.join(gone)}, which the checkpoint in {ckpt_dir} "
            "was reading: the cache was rebuilt; use --fresh (or another output) to start over"
        )
    new_shards = [s for s in manifest["shards"] if resume and s["file"] not in known]
    per_step = d.micro_batch_size * d.grad_accum * world
    total_steps = max(d.max_steps, resume["total_steps"] if resume else 0)
    if two:  # a fixed length: new shards are read next, but extend neither step
        total_steps = d.sft_steps + d.dpo_steps
        if resume and resume.get("phase") != method.phase(d, step):
            raise PipelineError(
                f"{ckpt_dir} was saved before a {resume.get('phase')} step, which "
                f"distill.sft_steps={d.sft_steps} contradicts: keep it, or use --fresh"
            )
    elif new_shards:  # cover the new rows once, even when the old budget is spent
        new_rows = sum(s["rows"] for s in new_shards)
        total_steps = max(total_steps, step + math.ceil(new_rows / per_step))
    if rank == 0:
        write_resolved(cfg, out)
    return Plan(
        method=method,
        student_dir=student_dir,
        tokenizer=tokenizer,
        manifest=manifest,
        rank=rank,
        world=world,
        cuda=torch.cuda.is_available(),
        resume=resume,
        step=step,
        total_steps=total_steps,
        new_shards=new_shards,
        per_step=per_step,
    )


def build(cfg: PipelineConfig, plan: Plan) -> Run:
    """The student (base model + multi-source attention + MMD projection) in a DeepSpeed engine,
    the checkpoint loaded, and the shard stream at its saved position."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from empathy_distill.stage2_distill.student import Student

    d, method, settings = cfg.distill, plan.method, plan.manifest["settings"]
    torch.manual_seed(d.seed)  # the new modules' initial weights
    base = AutoModelForCausalLM.from_pretrained(
        plan.student_dir, dtype=torch.bfloat16 if plan.cuda else torch.float32
    )
    model = Student(
        base,
        sources=d.privileged_sources if method.privileged else [],
        layer=d.attention_layer,
        feature_dim=settings["feature_dim"] if "mmd" in method.terms else None,
        privileged_dropout=d.privileged_dropout,
    )
    ds_config = deepspeed_config(cfg, plan.world, plan.cuda)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=None if "scheduler" in ds_config else warmup_cosine(d, plan.total_steps),
    )
    ckpt_dir, resume = d.output / "checkpoints", plan.resume
    safe_checkpoint_engine(engine)
    if resume:  # verified in read_resume
        loaded, _ = engine.load_checkpoint(str(ckpt_dir), tag=resume["tag"])
        if loaded is None:
            raise PipelineError(f"cannot load checkpoint {ckpt_dir / resume['tag']}; use --fresh")
    stream = ShardStream(
        d.shards,
        plan.manifest["shards"],
        rank=plan.rank,
        world_size=plan.world,
        seed=d.seed,
        buffer_size=d.shuffle_buffer,
        keep=lambda row: usable(row, target=method.target, skip_unparsed=d.skip_unparsed),
        state=resume["stream"] if resume else None,
    )
    stream.add_shards(plan.new_shards)

    tokenizer = plan.tokenizer
    sources = model.msa.sources if model.msa else []
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    def make_batch(rows: list[dict], targets: list[str]) -> dict:
        """Each row encoded for each target (target-major order), collated, on the device."""
        examples = [
            encode_row(
                r,
                tokenizer,
                target=t,
                sources=sources,
                max_len=d.max_seq_len,
                privileged_max_tokens=d.privileged_max_tokens,
            )
            for t in targets
            for r in rows
        ]
        return to_device(collate(examples, pad_id, settings["top_k"], sources), engine.device)

    return Run(cfg=cfg, plan=plan, model=model, engine=engine, stream=stream, make_batch=make_batch)


def to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return tuple(to_device(v, device) for v in x) if isinstance(x, tuple) else x


def mean_over_ranks(sums: dict[str, float], world: int, device) -> dict[str, float]:
    """The logged values averaged over ranks, reduced on the engine's device (NCCL has no CPU
    side). Every rank logs the same keys: the method, not the data, decides them. One rank
    reduces too: a few microseconds, and a single-GPU run proves the collective works."""
    flat = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    return dict(zip(sums, (flat / world).tolist(), strict=True))


def train(run: Run) -> dict[str, Any]:
    """The optimizer steps from the checkpoint's to the budget's: grad_accum micro-batches of
    the method's step function each, the mean losses logged, a checkpoint every
    `checkpoint_every` steps, at the end and wherever the method's boundary asks for one."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    cfg, plan, engine, method = run.cfg, run.plan, run.engine, run.plan.method
    d, rank, world = cfg.distill, plan.rank, plan.world
    step, total_steps = plan.step, plan.total_steps
    rows_trained = plan.resume["rows_trained"] if plan.resume else 0
    writer = SummaryWriter(str(run.out / "tensorboard")) if rank == 0 else None
    metrics_path = run.out / "metrics.jsonl"
    if rank == 0 and metrics_path.exists():  # drop lines past the checkpoint (a crashed run's)
        lines = metrics_path.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(metrics_path, "".join(ln + "\n" for ln in kept))
    metrics = metrics_path.open("a", encoding="utf-8") if rank == 0 else None
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=rank != 0,
        desc=f"distill {d.method}",
        file=console.err(),
    )
    if step == 0 and method.boundary:  # e.g. sft-dpo with sft_steps=0: DPO from the base
        method.boundary(run, step)
    engine.train()
    last: dict[str, float] = {}
    t_loop = time.time()
    try:
        while step < total_steps:
            t0 = time.time()
            sums: dict[str, float] = {}
            for micro in range(d.grad_accum):
                rows = [next(run.stream) for _ in range(d.micro_batch_size)]
                # Seeded by position, not by history: privileged dropout draws the same masks
                # whether or not the run was stopped and resumed.
                torch.manual_seed(d.seed + 7919 * ((step * d.grad_accum + micro) * world + rank))
                values = method.values(run, rows, step)
                engine.backward(values["loss"])
                lr = engine.get_lr()[0]
                engine.step()
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value.item() / d.grad_accum
            step += 1
            rows_trained += plan.per_step
            last = mean_over_ranks(sums, world, engine.device)
            if rank == 0:
                record = {"step": step, **last, "lr": lr, "seconds": round(time.time() - t0, 4)}
                log_step(record, metrics, writer, bar)
            forced = method.boundary(run, step) if method.boundary else False
            if step % d.checkpoint_every == 0 or step == total_steps or forced:
                run_state = {
                    "step": step,
                    "total_steps": total_steps,
                    "method": d.method,
                    "phase": method.phase(d, step),
                    "world_size": world,
                    "rows_trained": rows_trained,
                    "stream": run.stream.state_dict(),
                }
                ckpt_dir = run.out / "checkpoints"
                save_checkpoint(engine, ckpt_dir, step, run_state, rank, d.keep_checkpoints)
    finally:
        bar.close()
        if rank == 0:
            metrics.close()
            writer.close()
    done = step - plan.step
    return {
        "step": step,
        "rows_trained": rows_trained,
        "last": last,
        "seconds_per_step": round((time.time() - t_loop) / done, 3) if done else "-",
    }


def finish(run: Run, trained: dict[str, Any], t_start: float) -> dict[str, Any]:
    """Export the base model alone (the extra modules add nothing without privileged input),
    plot the losses and write the summary."""
    from empathy_distill.stage2_distill.student import export_student

    plan, d, out = run.plan, run.cfg.distill, run.out
    export_student(run.engine, plan.tokenizer, out / "final", plan.rank)
    dist.barrier()
    summary = {
        "method": d.method,
        "steps": f"{plan.step} -> {trained['step']} (of {plan.total_steps})",
        "resumed from": plan.resume["tag"] if plan.resume else "no (fresh start)",
        "new shards": ", ".join(s["file"] for s in plan.new_shards) or "none",
        **({"sft / dpo steps": f"{d.sft_steps} / {d.dpo_steps}"} if d.method == "sft-dpo" else {}),
        "shards": len(plan.manifest["shards"]),
        "rows trained": trained["rows_trained"],
        "ranks": plan.world,
        "last losses": ", ".join(f"{k} {v:.4f}" for k, v in trained["last"].items()) or "-",
        "seconds per step": trained["seconds_per_step"],
        "final": str(out / "final"),
        "seconds": round(time.time() - t_start, 1),
    }
    if plan.rank == 0:
        metrics_path = out / "metrics.jsonl"
        if metrics_path.stat().st_size:
            plot_losses(metrics_path, out / "loss.png")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def main(cfg: PipelineConfig) -> dict[str, Any]:
    t_start = time.time()
    try:
        plan = prepare(cfg)
        run = build(cfg, plan)
        return finish(run, train(run), t_start)
    finally:
        # The one-process group stays joined (DeepSpeed cannot join a second one), but the
        # process's environment is given back: later code never sees a launcher that was not.
        for name in _LAUNCHER_ENV:
            os.environ.pop(name, None)
        _LAUNCHER_ENV.clear()


if __name__ == "__main__":
    # For launchers: torchrun / deepspeed start this module once per rank.
    parser = argparse.ArgumentParser(description="pipeline distill, one rank")
    parser.add_argument("--config", default="pipelines.yaml")
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher adds it
    args = parser.parse_args()
    from empathy_distill.shared.models import stay_offline

    stay_offline()
    try:
        result = main(load_config(args.config, args.pipeline, args.overrides))
    except PipelineError as e:
        raise SystemExit(f"error: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:  # the launcher's
        print(json.dumps(result, indent=2))
