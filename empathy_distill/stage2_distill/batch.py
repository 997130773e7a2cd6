"""From shard rows to student tensors: prompt, target reply, its teacher top-k, privileged text.

Student input = `student_prompt(dialogue)` token ids followed by the reply token ids; the logits
at position p predict token p + 1, so reply token t is predicted at `len(prompt) - 1 + t`. Only
those positions are returned (flattened), so the 49k-wide vocabulary projection runs on reply
tokens only. A reply that does not end with the end-of-turn id (the teacher stopped at a blank
line) gets it appended as a CE-only target: the student learns to stop, and since the teacher
has no distribution there it is left out of the KL terms.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from empathy_distill.shared.prompts import student_prompt


def encode_row(
    row: dict[str, Any],
    tokenizer,
    *,
    target: str,
    sources: list[str],
    max_len: int,
    privileged_max_tokens: int,
) -> dict[str, Any]:
    """One example. `target`: "teacher" (its reply and top-k), "reference" (CE on the dataset's
    reply, for sft) or "base" (the reply an improve-mode teacher rewrote: the rejected side of a
    preference pair). Rows are assumed usable (see `usable`)."""
    eos = tokenizer.eos_token_id
    prompt = tokenizer(student_prompt(tokenizer, row["dialogue"]), add_special_tokens=False)
    prompt = prompt["input_ids"]
    if target == "teacher":
        reply = list(row["response_token_ids"])
        n_kl = len(reply)
        topk_ids, topk_lps = row["topk_token_ids"], row["topk_logprobs"]
        features = row["teacher_features"] if len(row["teacher_features"]) else None
    else:
        text = row["reference" if target == "reference" else "base_response"].strip()
        reply = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_kl, features = 0, None
        topk_ids, topk_lps = np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
    n_feat = n_kl  # the teacher pooled over its own reply tokens, not over an appended EOS
    if not reply or reply[-1] != eos:
        reply = reply + [eos]
    # Keep the reply whole when possible; cut the prompt from the left (oldest turns go first).
    reply = reply[: max_len - 1]
    n_kl, n_feat = min(n_kl, len(reply)), min(n_feat, len(reply))
    prompt = prompt[-(max_len - len(reply)) :]
    privileged = dict(row.get("privileged") or [])
    return {
        "input_ids": prompt + reply,
        "prompt_len": len(prompt),
        "reply_len": len(reply),
        "n_kl": n_kl,
        "topk_ids": topk_ids[:n_kl],
        "topk_lps": topk_lps[:n_kl],
        "n_feat": n_feat if features is not None else 0,
        "features": features,
        "privileged": {
            name: tokenizer(privileged[name], add_special_tokens=False)["input_ids"][
                :privileged_max_tokens
            ]
            for name in sources
            if privileged.get(name, "").strip()
        },
    }


def usable(row: dict[str, Any], *, target: str, skip_unparsed: bool) -> bool:
    if target == "reference":
        return bool((row.get("reference") or "").strip())
    if target == "pair" and not (row.get("base_response") or "").strip():
        return False  # sft-dpo needs the original beside the improved reply
    if not row["response_token_ids"]:
        return False
    return not (skip_unparsed and row.get("teacher_parse_ok") is False)


def collate(examples: list[dict[str, Any]], pad_id: int, top_k: int, sources: list[str]) -> dict:
    """Pad a batch (right padding) and flatten the predicted positions.

    Returns input tensors for the model (`input_ids`, `attention_mask`, `pred_rows`,
    `pred_cols`, `feat_rows`, `feat_cols`, `feat_index`, `privileged`) and targets for the losses
    (`targets`, `kl_mask`, `topk_ids`, `topk_lps`, `teacher_features`)."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    pred_rows, pred_cols, targets, kl_mask = [], [], [], []
    topk_ids = np.zeros((sum(e["reply_len"] for e in examples), top_k), np.int64)
    topk_lps = np.zeros(topk_ids.shape, np.float32)  # zeros where kl_mask is False
    feat_rows, feat_cols, feat_index, teacher_features = [], [], [], []
    for b, e in enumerate(examples):
        ids = e["input_ids"]
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        p, n_kl, at = e["prompt_len"], e["n_kl"], len(targets)
        if n_kl:
            topk_ids[at : at + n_kl] = e["topk_ids"][:n_kl]
            topk_lps[at : at + n_kl] = e["topk_lps"][:n_kl]
        for t in range(e["reply_len"]):
            pred_rows.append(b)
            pred_cols.append(p - 1 + t)
            targets.append(ids[p + t])
            kl_mask.append(t < n_kl)
        if e["n_feat"] > 0:
            for t in range(e["n_feat"]):
                feat_rows.append(b)
                feat_cols.append(p - 1 + t)  # the position predicting it, as the teacher pooled
                feat_index.append(len(teacher_features))
            teacher_features.append(e["features"])
    # Every configured source, present or not: a source no row has is one all-masked position,
    # so every rank runs the same modules whatever its micro-batch holds (ranks that ran
    # different modules would disagree in their collectives).
    privileged = {}
    for name in sources:
        seqs = [e["privileged"].get(name, []) for e in examples]
        n = max(1, *(len(s) for s in seqs))
        ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), n), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, : len(s)] = 1
        privileged[name] = (ids, mask)

    def long(x: list) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long)

    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pred_rows": long(pred_rows),
        "pred_cols": long(pred_cols),
        "feat_rows": long(feat_rows),
        "feat_cols": long(feat_cols),
        "feat_index": long(feat_index),
        "privileged": privileged,
        "targets": long(targets),
        "kl_mask": torch.tensor(kl_mask, dtype=torch.bool),
        "topk_ids": torch.from_numpy(topk_ids),
        "topk_lps": torch.from_numpy(topk_lps),
        "teacher_features": torch.from_numpy(np.stack(teacher_features).astype(np.float32))
        if teacher_features
        else None,
    }
