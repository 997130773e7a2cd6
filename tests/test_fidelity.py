"""Teacher fidelity (evaluation/fidelity.py): a model that is the teacher scores 0 KL both ways
and the teacher's own log-probabilities; a perturbed one scores more KL both ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from empathy_distill.evaluation.fidelity import fidelity
from empathy_distill.shared.models import load_tokenizer
from empathy_distill.shared.prompts import student_prompt

K = 8
DIALOGUES = [
    "My dog has lumps on her stomach and sees the vet tomorrow.",
    "I finally finished the marathon I trained a year for!",
    "My brother forgot my birthday again this year.",
]


def cached_rows(folder, model) -> list[dict]:
    """Rows as a held-out teacher cache holds them, with the top-k that `model` itself gives on
    the student prompt: the teacher, seen from exactly the student's context."""
    tok = load_tokenizer(folder)
    rows = []
    for i, text in enumerate(DIALOGUES):
        dialogue = [{"role": "speaker", "text": text}]
        prompt = tok(student_prompt(tok, dialogue), add_special_tokens=False)["input_ids"]
        reply = tok(f"That sounds like a lot, number {i}.", add_special_tokens=False)["input_ids"]
        reply = reply + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + reply])).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(reply)], -1)
        top = logp.topk(K, dim=-1)
        rows.append(
            {
                "example_id": f"ex{i}",
                "dialogue": dialogue,
                "privileged": [],
                "response_token_ids": np.asarray(reply),
                "topk_token_ids": top.indices.numpy(),
                "topk_logprobs": top.values.numpy().astype(np.float32),
                "target_logprob": logp[torch.arange(len(reply)), torch.tensor(reply)].numpy(),
                "teacher_features": np.zeros(0, np.float32),
            }
        )
    return rows


def test_the_teacher_itself_scores_zero_and_a_perturbed_model_more(tiny_teacher):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    with torch.no_grad():  # a random model is near uniform: sharpen it, as a trained one is
        model.get_output_embeddings().weight.mul_(4.0)
    rows = cached_rows(tiny_teacher, model)
    same = fidelity(tiny_teacher, rows, max_len=512, batch_size=2, model=model)
    assert same["tokens"] == sum(len(r["response_token_ids"]) for r in rows)
    assert abs(same["kl_teacher_student"]) < 1e-5 and abs(same["kl_student_teacher"]) < 1e-5
    exact = np.concatenate([r["target_logprob"] for r in rows]).mean()
    assert same["reply_logprob"] == pytest.approx(float(exact), abs=1e-4)

    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = fidelity(tiny_teacher, rows, max_len=512, batch_size=2, model=model)
    assert other["kl_teacher_student"] > 0.01 and other["kl_student_teacher"] > 0.01
    # (these replies are not the teacher's samples: another model may well like them more)
    assert other["reply_logprob"] != pytest.approx(same["reply_logprob"], abs=1e-3)
