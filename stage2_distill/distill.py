"""Stage two: stream teacher shards into DeepSpeed training of the student, then export it.

    pipeline distill --pipeline demo                            # one process (CPU or one GPU)
    torchrun --nproc_per_node 2 -m stage2_distill.distill --pipeline demo
    deepspeed --num_gpus 8 --module stage2_distill.distill --pipeline ed-text

Reads `distill.shards` (a teacher cache), writes to `distill.output`: resolved_config.yaml,
checkpoints/, metrics.jsonl, tensorboard/, loss.png, summary.json and final/ (the student as a
plain Hugging Face folder). Rerunning on the same output resumes from the last checkpoint,
stream position included; shards the cache gained since then are trained on next (the step
budget grows to cover them once); `distill.fresh=true` (`--fresh`) starts over.
`distill.method: sft-dpo` (Xie et al.'s SFT then DPO) is laid out in stage2_distill/two_step.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shared.config import LossWeights, PipelineConfig, load_config, write_resolved
from shared.errors import PipelineError
from shared.models import ensure_model, load_tokenizer, tokenizer_fingerprint
from shared.schema import atomic_write_text, verify_cache
from stage2_distill import losses, two_step
from stage2_distill.batch import collate, encode_row, usable
from stage2_distill.stream import ShardStream, check_shards

# method: (loss terms, multi-source attention over privileged text, what the CE target is)
METHODS: dict[str, tuple[tuple[str, ...], bool, str]] = {
    "pride": (("ce", "rkl", "mmd"), True, "teacher"),
    "pride-no-pi": (("ce", "rkl", "mmd"), False, "teacher"),
    "pride-no-mmd": (("ce", "rkl"), True, "teacher"),
    "pride-no-rkl": (("ce", "mmd"), True, "teacher"),
    "sft": (("ce",), False, "reference"),
    "seqkd": (("ce",), False, "teacher"),
    "kd": (("ce", "fkl"), False, "teacher"),
    "sft-dpo": (("ce",), False, "pair"),  # the loop calls two_step for its losses
}
MODEL_INPUTS = ("input_ids", "attention_mask", "pred_rows", "pred_cols")
FEATURE_INPUTS = ("feat_rows", "feat_cols", "feat_index")


# ----------------------------------------------------------------------------- helpers


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group; without a launcher, be rank 0 of 1."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port, so two single-process runs can coexist
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


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
    optimizer.setdefault("params", {}).update(lr=d.lr, weight_decay=d.weight_decay)
    if not cuda:
        optimizer["params"]["torch_adam"] = True  # DeepSpeed's fused Adam is CUDA-only
    ds["bf16"] = {"enabled": cuda}  # fp32 on the CPU: bf16 matmuls there are slow and lossy
    if cuda and d.grad_accum > 1:  # sum micro-batch gradients in fp32, not in bf16
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
    path = ckpt_dir / tag / f"run_state_rank{rank}.json"
    if not path.is_file():
        raise PipelineError(f"{path} is missing: checkpoint {tag} is incomplete; use --fresh")
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
    engine, ckpt_dir: Path, step: int, run_state: dict, rank: int, keep: int
) -> None:
    """Each rank's stream position first, then DeepSpeed's files; DeepSpeed writes `latest`
    last, so a checkpoint it names is complete. Older checkpoints beyond `keep` are deleted."""
    tag = f"step{step:07d}"
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    atomic_write_text(ckpt_dir / tag / f"run_state_rank{rank}.json", json.dumps(run_state))
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    dist.barrier()
    if rank == 0:
        for old in sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


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


# ----------------------------------------------------------------------------- main


def main(cfg: PipelineConfig) -> dict[str, Any]:
    t_start = time.time()
    d = cfg.distill
    terms, use_privileged, target = METHODS[d.method]
    two = d.method == "sft-dpo"

    # 1. The contract, before anything heavy: the cache must fit the student's tokenizer.
    student_dir = ensure_model(cfg.student.model)
    tokenizer = load_tokenizer(student_dir)
    manifest = verify_cache(
        d.shards,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer),
        top_k=d.top_k,
    )
    check_shards(d.shards, manifest)
    if not manifest["shards"]:
        raise PipelineError(f"{d.shards}: the cache has no shards; run `pipeline teacher-cache`")
    if two:
        two_step.check_pairs(d.shards, manifest)
    settings = manifest["settings"]
    if "mmd" in terms and not settings.get("feature_dim"):
        terms = tuple(t for t in terms if t != "mmd")  # the cache was built with features off
        print(f"note: {d.shards} has no teacher features; training {d.method} without MMD")

    # 2. Processes, output folder, where to resume from.
    import deepspeed
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from stage2_distill.student import PrideStudent, export_student

    rank, world = init_distributed()
    cuda = torch.cuda.is_available()
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
        if resume and resume.get("phase") != two_step.phase(d.sft_steps, step):
            raise PipelineError(
                f"{ckpt_dir} was saved before a {resume.get('phase')} step, which "
                f"distill.sft_steps={d.sft_steps} contradicts: keep it, or use --fresh"
            )
    elif new_shards:  # cover the new rows once, even when the old budget is spent
        new_rows = sum(s["rows"] for s in new_shards)
        total_steps = max(total_steps, step + math.ceil(new_rows / per_step))
    if rank == 0:
        write_resolved(cfg, out)

    # 3. The student: base model + multi-source attention + MMD projection, in the engine.
    torch.manual_seed(d.seed)  # the new modules' initial weights
    base = AutoModelForCausalLM.from_pretrained(
        student_dir, dtype=torch.bfloat16 if cuda else torch.float32
    )
    model = PrideStudent(
        base,
        sources=d.privileged_sources if use_privileged else [],
        layer=d.attention_layer,
        feature_dim=settings["feature_dim"] if "mmd" in terms else None,
        privileged_dropout=d.privileged_dropout,
    )
    ds_config = deepspeed_config(cfg, world, cuda)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=None if "scheduler" in ds_config else warmup_cosine(d, total_steps),
    )
    if resume:
        loaded, _ = engine.load_checkpoint(str(ckpt_dir), tag=resume["tag"])
        if loaded is None:
            raise PipelineError(f"cannot load checkpoint {ckpt_dir / resume['tag']}; use --fresh")
    stream = ShardStream(
        d.shards,
        manifest["shards"],
        rank=rank,
        world_size=world,
        seed=d.seed,
        buffer_size=d.shuffle_buffer,
        keep=lambda row: usable(row, target=target, skip_unparsed=d.skip_unparsed),
        state=resume["stream"] if resume else None,
    )
    stream.add_shards(new_shards)

    # 4. Train.
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
        return to_device(collate(examples, pad_id, settings["top_k"], sources))

    def to_device(x):
        if isinstance(x, torch.Tensor):
            return x.to(engine.device)
        if isinstance(x, dict):
            return {k: to_device(v) for k, v in x.items()}
        return tuple(to_device(v) for v in x) if isinstance(x, tuple) else x

    rows_trained = resume["rows_trained"] if resume else 0
    first_step, last = step, {}
    writer = SummaryWriter(str(out / "tensorboard")) if rank == 0 else None
    metrics_path = out / "metrics.jsonl"
    if rank == 0 and metrics_path.exists():  # drop lines past the checkpoint (a crashed run's)
        lines = metrics_path.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(metrics_path, "".join(ln + "\n" for ln in kept))
    metrics = metrics_path.open("a", encoding="utf-8") if rank == 0 else None
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc=f"distill {d.method}")
    reference = None  # sft-dpo: the frozen step-one model, once step two begins
    if two and step == 0 and d.sft_steps == 0:
        two_step.save_reference(engine, tokenizer, out, rank)  # DPO from the base student
    engine.train()
    t_loop = time.time()
    while step < total_steps:
        t0 = time.time()
        sums: dict[str, float] = {}
        in_dpo = two and step >= d.sft_steps
        if in_dpo and reference is None:
            reference = two_step.load_reference(out, engine.device, base.dtype)
        for micro in range(d.grad_accum):
            rows = [next(stream) for _ in range(d.micro_batch_size)]
            # Seeded by position, not by history: privileged dropout draws the same masks
            # whether or not the run was stopped and resumed.
            torch.manual_seed(d.seed + 7919 * ((step * d.grad_accum + micro) * world + rank))
            if in_dpo:
                values = two_step.dpo_values(engine, reference, rows, make_batch, d.dpo_beta)
            elif two:
                values = two_step.sft_values(engine, rows, make_batch, d.sft_on_originals)
            else:
                batch = make_batch(rows, [target])
                inputs = {k: batch[k] for k in MODEL_INPUTS}
                if model.proj is not None:
                    inputs.update({k: batch[k] for k in FEATURE_INPUTS})
                if model.msa is not None:
                    inputs["privileged"] = batch["privileged"]
                values = compute_losses(engine(**inputs), batch, terms, d.weights, d.temperature)
            engine.backward(values["loss"])
            lr = engine.get_lr()[0]
            engine.step()
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value.item() / d.grad_accum
        step += 1
        rows_trained += per_step
        if world > 1:  # log the mean over ranks (on the engine's device: NCCL has no CPU side)
            flat = torch.tensor(list(sums.values()), dtype=torch.float64, device=engine.device)
            dist.all_reduce(flat)
            sums = dict(zip(sums, (flat / world).tolist(), strict=True))
        last = sums
        if rank == 0:
            record = {"step": step, **sums, "lr": lr, "seconds": round(time.time() - t0, 4)}
            log_step(record, metrics, writer, bar)
        switch = two and step == d.sft_steps  # step one done: its model is step two's reference
        if switch:
            two_step.save_reference(engine, tokenizer, out, rank)
        if step % d.checkpoint_every == 0 or step == total_steps or switch:
            run_state = {
                "step": step,
                "total_steps": total_steps,
                "method": d.method,
                # sft-dpo: the step the next optimizer step is in (dpo: needs sft_reference/)
                "phase": two_step.phase(d.sft_steps, step) if two else "train",
                "world_size": world,
                "rows_trained": rows_trained,
                "stream": stream.state_dict(),
            }
            save_checkpoint(engine, ckpt_dir, step, run_state, rank, d.keep_checkpoints)
    bar.close()

    # 5. Export the base model alone (the extra modules add nothing without privileged input).
    export_student(engine, tokenizer, out / "final", rank)
    dist.barrier()
    summary = {
        "method": d.method,
        "steps": f"{first_step} -> {step} (of {total_steps})",
        "resumed from": resume["tag"] if resume else "no (fresh start)",
        "new shards": ", ".join(s["file"] for s in new_shards) or "none",
        **({"sft / dpo steps": f"{d.sft_steps} / {d.dpo_steps}"} if two else {}),
        "shards": len(manifest["shards"]),
        "rows trained": rows_trained,
        "ranks": world,
        "last losses": ", ".join(f"{k} {v:.4f}" for k, v in last.items()) or "-",
        "seconds per step": round((time.time() - t_loop) / (step - first_step), 3)
        if step > first_step
        else "-",
        "final": str(out / "final"),
        "seconds": round(time.time() - t_start, 1),
    }
    if rank == 0:
        metrics.close()
        writer.close()
        if metrics_path.stat().st_size:
            plot_losses(metrics_path, out / "loss.png")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    # For launchers: torchrun / deepspeed start this module once per rank.
    parser = argparse.ArgumentParser(description="pipeline distill, one rank")
    parser.add_argument("--config", default="pipelines.yaml")
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher adds it
    args = parser.parse_args()
    try:
        result = main(load_config(args.config, args.pipeline, args.overrides))
    except PipelineError as e:
        raise SystemExit(f"error: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
