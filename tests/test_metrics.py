"""The evaluation metrics against small cases computed by hand (evaluation/metrics.py)."""

import math

import pytest
import torch

from empathy_distill.evaluation import metrics
from empathy_distill.evaluation.metrics import (
    bertscore_f1,
    bleu4,
    distinct,
    lcs_length,
    rouge_l,
    tokenize,
)


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("I don't know, OK?") == ["i", "don't", "know", ",", "ok", "?"]


def test_bleu4_with_smoothing_by_hand():
    cand, ref = tokenize("the cat sat on the mat"), tokenize("the cat is on the mat")
    # unigrams 5/6 (unsmoothed); bigrams 3 of 5 -> (3+1)/(5+1); trigrams 1 of 4 -> 2/5;
    # 4-grams 0 of 3 -> 1/4; equal lengths, so no brevity penalty.
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert bleu4(cand, ref) == pytest.approx(expected)
    assert expected == pytest.approx(0.4855, abs=1e-4)


def test_bleu4_clipping_brevity_and_edges():
    # "the" counted at most as often as in the reference: 1/3; bigrams (0+1)/(2+1); trigrams
    # (0+1)/(1+1); no 4-gram: (0+1)/(0+1).
    assert bleu4(["the"] * 3, ["the", "cat"]) == pytest.approx((1 / 3 * 1 / 3 * 1 / 2) ** 0.25)
    # A perfect but short candidate: precisions 1, brevity penalty exp(1 - 6/2).
    short = bleu4(tokenize("the cat"), tokenize("the cat sat on the mat"))
    assert short == pytest.approx(math.exp(-2))
    same = tokenize("i am so sorry to hear that")
    assert bleu4(same, same) == pytest.approx(1.0)
    assert bleu4([], same) == 0.0 and bleu4(["zebra"], same) == 0.0


def test_rouge_l_is_the_lcs_f1():
    cand, ref = list("abcde"), list("axcyez")
    assert lcs_length(cand, ref) == 3  # a, c, e
    p, r = 3 / 5, 3 / 6
    assert rouge_l(cand, ref) == pytest.approx(2 * p * r / (p + r))
    assert rouge_l(cand, cand) == 1.0 and rouge_l(cand, list("xyz")) == 0.0
    assert rouge_l([], ref) == 0.0


def test_distinct_counts_over_all_replies():
    replies = [["a", "b", "a"], ["a", "c"]]
    assert distinct(replies, 1) == pytest.approx(3 / 5)  # a b c out of a b a a c
    assert distinct(replies, 2) == 1.0  # (a b) (b a) (a c): all different
    assert distinct([["a", "a"], ["a", "a"]], 2) == 0.5
    assert distinct([[], ["a"]], 2) == 0.0


def test_bertscore_greedy_matching_by_hand():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cand = torch.tensor([[2.0, 0.0]])  # scale does not matter: cosine
    # precision: its one token matches ref token 0 (1.0); recall: ref tokens match 1.0 and 0.0.
    assert bertscore_f1(cand, ref) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert bertscore_f1(ref, ref) == pytest.approx(1.0)
    assert bertscore_f1(torch.zeros(0, 2), ref) == 0.0


def test_bertscore_with_the_local_encoder():
    encoder = metrics.TokenEncoder()
    texts = [
        "I'm so sorry you lost your job, that must be really hard.",
        "I am sorry about your job, that sounds very hard.",
        "The train to Zurich leaves from platform seven at noon.",
    ]
    a, near, far = encoder.embed(texts)
    assert bertscore_f1(a, a) == pytest.approx(1.0, abs=1e-5)
    assert bertscore_f1(a, far) < bertscore_f1(a, near) < 1.0
    assert a.shape[0] == len(encoder.tokenizer.tokenize(texts[0]))  # no [CLS], [SEP], padding
