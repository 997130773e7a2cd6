"""The pairwise LLM judge: which of two replies is more empathetic, asked in both orders.

The judge reads `judge_prompt` (answer primed up to "Reply") and we compare its
log-probabilities of the next tokens " A" and " B" (vLLM's `logprob_token_ids`): an answer never
fails to parse, and a judge that cannot follow instructions simply shows up as a coin flip.

Every pair is asked twice, with the replies swapped. A reply wins only when the judge prefers it
in both orders; a split verdict (the judge picked the same *position* twice) is a tie, so position
bias cancels instead of deciding. Identical replies are a tie without asking.

The judge check asks the same judge about pairs of rated replies (Welivita & Pu) whose human
ratings differ, and reports how often it sides with the people.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from empathy_distill.shared import console, prompts
from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.readers import read_examples

Triple = tuple[list[dict], str, str]  # (dialogue, reply x, reply y)

# --- the judge's prompt -------------------------------------------------------------------
# The judge's answer is primed up to "Reply", so its very next token is " A" or " B"; the caller
# compares the judge's log-probabilities of those two tokens, which always gives an answer.

JUDGE_SYSTEM = (
    "You are an expert in empathetic communication. You compare two replies that a listener "
    "could give to a person who shared something with them."
)

JUDGE_USER = """Conversation:
{dialogue}

Reply A: {reply_a}

Reply B: {reply_b}

Which reply is more empathetic: which one better understands how the speaker feels, shows \
warmth and care, and fits their situation? Answer A or B."""

JUDGE_ANSWER_PREFIX = "The more empathetic reply is Reply"
JUDGE_CHOICES = (" A", " B")


def judge_prompt(tokenizer, dialogue: list[dict], reply_a: str, reply_b: str) -> str:
    """The judge's prompt as text (chat template applied, answer primed up to the choice)."""
    user = JUDGE_USER.format(
        dialogue=prompts.render_dialogue(dialogue), reply_a=reply_a.strip(), reply_b=reply_b.strip()
    )
    messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]
    return prompts.render_chat(tokenizer, messages) + JUDGE_ANSWER_PREFIX


def judge_choice_ids(tokenizer) -> tuple[int, int]:
    """Token ids of " A" and " B" for this judge's tokenizer (each must be a single token)."""
    ids = [tokenizer.encode(c, add_special_tokens=False) for c in JUDGE_CHOICES]
    if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
        raise ValueError(f"the judge's tokenizer does not encode {JUDGE_CHOICES} as single tokens")
    return ids[0][0], ids[1][0]


def progress(label: str):
    """Pass as vLLM's `use_tqdm`: its request bar under our label. vLLM also wraps the prompt
    list it renders in the same factory (an iterable, positionally); that instant bar is hidden."""
    from tqdm import tqdm

    def bar(*iterable, **kw):
        if iterable:
            return tqdm(*iterable, **kw, disable=True)
        return tqdm(**{**kw, "desc": label, "file": console.err()})

    return bar


def ask(
    llm, tokenizer, items: list[Triple], max_len: int, label: str = "judge"
) -> list[tuple[str, float] | None]:
    """Per (dialogue, A, B): the verdict "A", "B" or "=" (equal log-probabilities) and the margin
    log p(" A") - log p(" B"); None when the prompt does not fit the judge's context."""
    from vllm import SamplingParams

    try:
        ids_ab = judge_choice_ids(tokenizer)
    except ValueError as e:
        raise PipelineError(f"{e}; use another judge (evaluate.judge)") from None
    params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(ids_ab))
    encoded = [
        tokenizer(judge_prompt(tokenizer, d, a, b), add_special_tokens=False)["input_ids"]
        for d, a, b in items
    ]
    fits = [i for i, ids in enumerate(encoded) if len(ids) < max_len]
    requests = [{"prompt_token_ids": encoded[i]} for i in fits]
    outs = llm.generate(requests, params, use_tqdm=progress(label))
    verdicts: list[tuple[str, float] | None] = [None] * len(items)
    for i, out in zip(fits, outs, strict=True):
        logprobs = out.outputs[0].logprobs[0]
        margin = logprobs[ids_ab[0]].logprob - logprobs[ids_ab[1]].logprob
        verdicts[i] = ("A" if margin > 0 else "B" if margin < 0 else "=", margin)
    return verdicts


def both_orders(
    llm, tokenizer, items: list[Triple], max_len: int, label: str = "judge"
) -> list[dict[str, Any]]:
    """For each (dialogue, x, y): the verdict with x shown first and with y shown first, and the
    outcome for x: "win" (preferred in both orders), "loss", "tie", or "unjudged" (too long).

    `margin` is x's log-odds advantage summed over both orders, (log p(A) - log p(B)) with x as A
    minus the same with x as B: a judge's constant preference for one position cancels in it, so
    its sign (`debiased`) still separates the replies when the verdicts split on position."""
    ask_idx = [i for i, (_, x, y) in enumerate(items) if x.strip() != y.strip()]
    asked = [items[i] for i in ask_idx]
    swapped = [(d, y, x) for d, x, y in asked]
    verdicts = ask(llm, tokenizer, asked + swapped, max_len, label)
    same = {"x_first": None, "y_first": None, "outcome": "tie", "margin": 0.0, "debiased": "tie"}
    results = [dict(same) for _ in items]
    for k, i in enumerate(ask_idx):
        first, second = verdicts[k], verdicts[k + len(asked)]
        if first is None or second is None:
            results[i] = {**same, "outcome": "unjudged", "margin": None, "debiased": "unjudged"}
            continue
        margin = first[1] - second[1]
        results[i] = {
            "x_first": first[0],
            "y_first": second[0],
            "outcome": outcome(first[0], second[0]),
            "margin": margin,
            "debiased": "win" if margin > 0 else "loss" if margin < 0 else "tie",
        }
    return results


def outcome(x_first: str | None, y_first: str | None) -> str:
    """x_first: the verdict with x as reply A; y_first: with x as reply B."""
    if x_first is None or y_first is None:
        return "unjudged"
    if x_first == "A" and y_first == "B":
        return "win"
    if x_first == "B" and y_first == "A":
        return "loss"
    return "tie"


def win_rates(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Win / tie / loss shares of the judged pairs (both verdicts), and the same by the sign of
    the position-debiased margin."""
    judged = [r for r in results if r["outcome"] != "unjudged"]
    n = len(judged)

    def share(key: str, value: str) -> float | None:
        return sum(r[key] == value for r in judged) / n if n else None

    return {
        "pairs": n,
        "wins": sum(r["outcome"] == "win" for r in judged),
        "ties": sum(r["outcome"] == "tie" for r in judged),
        "losses": sum(r["outcome"] == "loss" for r in judged),
        "win_rate": share("outcome", "win"),
        "tie_rate": share("outcome", "tie"),
        "loss_rate": share("outcome", "loss"),
        "debiased_win_rate": share("debiased", "win"),
        "debiased_loss_rate": share("debiased", "loss"),
        "unjudged": len(results) - n,
    }


# --- the judge check against human ratings ---------------------------------------------------


def rated_pairs(path: Path | None, n: int, seed: int) -> tuple[list[dict], str | None]:
    """Up to `n` pairs of replies to the same context whose human ratings differ, drawn at random
    (fixed seed) from every such pair in the file; or ([], why not) when there is nothing to do."""
    if n == 0:
        return [], "judge check skipped (evaluate.judge_check_pairs = 0)"
    if path is None:
        why = "no rated data (set evaluate.judge_check_data to a Welivita & Pu CSV)"
        return [], f"judge check skipped: {why}"
    if not Path(path).is_file():
        return [], f"judge check skipped: rated data not found at {path}"
    examples, _ = read_examples(Path(path))
    pairs = []
    for ex in examples:
        rated = [c for c in ex.candidates if c["rating"] is not None and c["text"].strip()]
        for i, a in enumerate(rated):
            for b in rated[i + 1 :]:
                if a["rating"] != b["rating"]:
                    better, worse = (a, b) if a["rating"] > b["rating"] else (b, a)
                    pairs.append(
                        {
                            "example_id": ex.example_id,
                            "dialogue": ex.dialogue,
                            "better": better["text"],
                            "worse": worse["text"],
                            "better_name": better["name"],
                            "worse_name": worse["name"],
                            "ratings": (better["rating"], worse["rating"]),
                        }
                    )
    if not pairs:
        return [], f"judge check skipped: no pairs with different ratings in {path}"
    random.Random(seed).shuffle(pairs)
    return pairs[:n], None


def judge_check(llm, tokenizer, pairs: list[dict], max_len: int) -> dict[str, Any]:
    """How often the judge prefers the reply people rated higher: per question (both orders
    counted) and per pair (right in both orders); how often it picks the same reply in both
    orders, and how often it answers "A" (0.5 = no position bias)."""
    items = [(p["dialogue"], p["better"], p["worse"]) for p in pairs]
    results = both_orders(llm, tokenizer, items, max_len, "judge check")
    judged = [r for r in results if r["outcome"] != "unjudged"]
    n = len(judged)
    if n == 0:
        return {"pairs": 0, "unjudged": len(results)}
    right = sum((r["x_first"] == "A") + (r["y_first"] == "B") for r in judged)
    picks_a = sum((r["x_first"] == "A") + (r["y_first"] == "A") for r in judged)
    return {
        "pairs": n,
        "agreement": right / (2 * n),
        "agreement_both_orders": sum(r["outcome"] == "win" for r in judged) / n,
        "disagreement_both_orders": sum(r["outcome"] == "loss" for r in judged) / n,
        "position_consistency": sum(r["outcome"] in ("win", "loss") for r in judged) / n,
        "debiased_agreement": sum(r["debiased"] == "win" for r in judged) / n,
        "picks_a_rate": picks_a / (2 * n),
        "unjudged": len(results) - n,
    }
