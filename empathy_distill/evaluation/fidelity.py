"""Teacher fidelity: how much of the teacher's behaviour a model has taken, measured on held-out
dialogues that have a teacher cache of their own (`evaluate.teacher_cache`).

    figures = fidelity(model_folder, rows, max_len)      # rows: the held-out cache's rows

Each model reads the student prompt (no privileged notes, as a deployed student does) followed
by the teacher's cached reply, teacher-forced, and at every reply token its distribution is
compared with the teacher's cached top-k plus the tail bucket, with stage two's own losses
(`stage2_distill/losses.py`, one definition of the bucketed KL) and its own row encoding
(`stage2_distill/batch.py`):

- `kl_teacher_student`: KL(teacher || model), mass-covering; `kl_student_teacher`:
  KL(model || teacher), mode-seeking (what `pride` trains); nats per reply token;
- `reply_logprob`: the model's mean log-probability of the teacher's reply tokens.

Token-weighted means over the whole cache. A model identical to the teacher on the teacher's
own context scores 0 KL; here the context is the student's, so even the teacher scores above 0
(what the privileged notes and the analysis turn were worth to it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from empathy_distill.shared.models import load_tokenizer
from empathy_distill.shared.schema import read_rows, verify_cache
from empathy_distill.stage2_distill.batch import collate, encode_row, usable
from empathy_distill.stage2_distill.losses import cross_entropy, forward_kl_topk, reverse_kl_topk

FIGURES = ("kl_teacher_student", "kl_student_teacher", "reply_logprob")


def read_cache(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The held-out cache's manifest and its rows with a reply (checked as stage two checks a
    cache, top-k decoded)."""
    manifest = verify_cache(folder)
    rows = [r for e in manifest["shards"] for r in read_rows(Path(folder) / e["file"])]
    return manifest, [r for r in rows if usable(r, target="teacher", skip_unparsed=False)]


def token_figures(logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The figures of one batch, as means over its reply tokens that have a teacher top-k.
    `logits`: [N, V], one row per predicted position of `batch` (`collate`)."""
    mask, ids, lps = batch["kl_mask"], batch["topk_ids"], batch["topk_lps"]
    return {
        "kl_teacher_student": forward_kl_topk(logits, ids, lps, mask),
        "kl_student_teacher": reverse_kl_topk(logits, ids, lps, mask),
        "reply_logprob": -cross_entropy(logits, batch["targets"], mask),
    }


@torch.no_grad()
def fidelity(
    folder: Path, rows: list[dict[str, Any]], max_len: int, batch_size: int = 4, model=None
) -> dict[str, Any]:
    """The `FIGURES` of the model in `folder` over `rows` (transformers, float32, on the CPU or
    the first GPU; `model`: the folder's model, already loaded). The model's tokenizer must be
    the cache's (`tokenizer_fingerprint`: its logits line up with the cached ids), which
    `pipeline evaluate` checks before any engine starts."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = model.to(device).eval()
    body, head = model.get_decoder(), model.get_output_embeddings()
    top_k = rows[0]["topk_token_ids"].shape[1] if rows else 0
    sums = dict.fromkeys(FIGURES, 0.0)
    tokens = 0
    for start in range(0, len(rows), batch_size):
        examples = [
            encode_row(
                row,
                tokenizer,
                target="teacher",
                sources=[],
                max_len=max_len,
                privileged_max_tokens=0,
            )
            for row in rows[start : start + batch_size]
        ]
        batch = collate(examples, tokenizer.pad_token_id or 0, top_k, [])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        hidden = body(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        # the vocabulary projection at the predicted positions only (49k wide)
        logits = head(hidden[batch["pred_rows"], batch["pred_cols"]])
        n = int(batch["kl_mask"].sum())
        for name, value in token_figures(logits, batch).items():
            sums[name] += float(value) * n
        tokens += n
    return {
        **{name: (sums[name] / tokens if tokens else None) for name in FIGURES},
        "tokens": tokens,
        "replies": len(rows),
    }
