"""Xie et al.'s two-step training, `distill.method: sft-dpo`; stage2_distill/distill.py runs it.

    pipeline distill --pipeline xie-two-step      # an improve-mode cache (teacher_cache.mode)

The cache must come from `teacher-cache` in the improve mode: each row is a preference pair,
chosen = the teacher's improved reply (`response_token_ids`), rejected = the reply it improved
(`base_response`, tokenized with the student tokenizer, which is the teacher's).

- Step one, steps [0, sft_steps): SFT, CE on the improved replies. With
  `distill.sft_on_originals` every row also gives a CE example on its original. Xie et al. SFT
  the small model on the LLM-distilled (improved) responses; the paper can also be read as SFT
  on the originals too. We default to the improved replies only: SFT on the rejected side would
  teach the replies step two then pushes away from.
- Step two, steps [sft_steps, sft_steps + dpo_steps): sigmoid DPO (losses.dpo_loss) on the same
  rows, beta `distill.dpo_beta`, the step-one model as the frozen reference.

One DeepSpeed engine, optimizer and warm-up + cosine schedule span both steps (no
re-initialisation: one checkpoint format, and a resume is the usual engine.load_checkpoint);
`distill.max_steps` is not used, the run is sft_steps + dpo_steps long. The phase is in each
checkpoint's run state.

The reference: at the switch the step-one model is exported exactly as final/ is (under ZeRO-3
the partitioned weights are gathered first) to `output/sft_reference/`, a checkpoint is forced,
and every rank loads that folder as a plain frozen module on its own device (eval mode, no
gradients, no optimizer state). A run resumed in step two loads the same folder, so it sees the
very reference an uninterrupted run does. The cost is one extra copy of the student's weights
per rank, fine up to a few billion parameters; past that, precompute the reference
log-probabilities in a pass before step two instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from empathy_distill.shared.errors import PipelineError
from empathy_distill.stage2_distill import losses
from empathy_distill.stage2_distill.student import Student, export_student

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from empathy_distill.shared.models import Tokenizer

REFERENCE = "sft_reference"
MODEL_INPUTS = ("input_ids", "attention_mask", "pred_rows", "pred_cols")


def phase(sft_steps: int, step: int) -> str:
    """Which step the optimizer step `step` (0-based) belongs to."""
    return "sft" if step < sft_steps else "dpo"


def save_reference(engine: DeepSpeedEngine, tokenizer: Tokenizer, out: Path, rank: int) -> None:
    """The step-one model as a plain Hugging Face folder (every rank must call this)."""
    export_student(engine, tokenizer, out / REFERENCE, rank)
    dist.barrier()


def load_reference(out: Path, device, dtype: torch.dtype) -> Student:
    folder = out / REFERENCE
    if not (folder / "config.json").is_file():
        raise PipelineError(
            f"{folder} is missing: the checkpoint is in the DPO step but its reference (the SFT "
            "model) is gone; use --fresh to start over"
        )
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    reference = Student(base, sources=[]).to(device).eval()
    reference.requires_grad_(False)
    return reference


def values(run, rows: list[dict], step: int) -> dict:
    """distill's step function for sft-dpo: step one's CE or step two's DPO, by the step."""
    d = run.cfg.distill
    if phase(d.sft_steps, step) == "sft":
        return sft_values(run.engine, rows, run.make_batch, d.sft_on_originals)
    if run.reference is None:  # the first DPO step of this process (fresh or resumed)
        run.reference = load_reference(run.out, run.engine.device, run.model.base.dtype)
    return dpo_values(run.engine, run.reference, rows, run.make_batch, d.dpo_beta)


def boundary(run, step: int) -> bool:
    """After `step` optimizer steps: at the switch, export step one's model as step two's
    reference and force a checkpoint (so a resumed DPO step finds both)."""
    if step != run.cfg.distill.sft_steps:
        return False
    save_reference(run.engine, run.plan.tokenizer, run.out, run.plan.rank)
    return True


def sft_values(engine, rows: list[dict], make_batch: Callable, on_originals: bool) -> dict:
    """Step one: CE on the improved replies (and on the originals, `sft_on_originals`)."""
    batch = make_batch(rows, ["teacher", "base"] if on_originals else ["teacher"])
    logits = engine(**{k: batch[k] for k in MODEL_INPUTS})["logits"]
    every = torch.ones_like(batch["targets"], dtype=torch.bool)
    ce = losses.cross_entropy(logits, batch["targets"], every)
    return {"ce": ce, "loss": ce}


def dpo_values(engine, reference, rows: list[dict], make_batch: Callable, beta: float) -> dict:
    """Step two: chosen and rejected replies of the same rows in one batch (chosen first)."""
    batch = make_batch(rows, ["teacher", "base"])
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    n = 2 * len(rows)
    every = torch.ones_like(batch["targets"], dtype=torch.bool)

    def logps(logits):
        return losses.sequence_logprobs(logits, batch["targets"], every, batch["pred_rows"], n)

    policy = logps(engine(**inputs)["logits"])
    with torch.no_grad():
        ref = logps(reference(**inputs)["logits"])
    b = len(rows)
    loss = losses.dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta)
    # Implicit rewards beta * log(pi / ref): the margin should grow, chosen > rejected more often.
    rewards = beta * (policy - ref).detach()
    chosen, rejected = rewards[:b], rewards[b:]
    return {
        "dpo": loss,
        "reward_margin": (chosen - rejected).mean(),
        "reward_accuracy": (chosen > rejected).float().mean(),
        "loss": loss,
    }
