"""`pipeline evaluate` without an engine: model specs, the judge's bookkeeping, the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, REPO

from empathy_distill.evaluation import judge, report
from empathy_distill.shared.config import load_config, split_model_spec
from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.readers import read_examples


def test_model_specs_and_their_paths(tmp_path):
    assert split_model_spec("teacher") == ("teacher", "teacher")
    assert split_model_spec("runs/demo/student") == ("student", "runs/demo/student")
    assert split_model_spec("sft=runs/sft") == ("sft", "runs/sft")
    cfg = load_config(
        REPO / "pipelines.yaml",
        "demo",
        ['evaluate.models=["teacher", "sft=runs/sft", "/abs/x"]', "evaluate.judge=models/j"],
    )
    assert cfg.evaluate.models == ["teacher", f"sft={REPO / 'runs/sft'}", "x=/abs/x"]
    assert cfg.evaluate.judge == str(REPO / "models/j")
    assert cfg.evaluate.judge_check_data is None  # a path the user gives: nothing outside the repo
    given = load_config(REPO / "pipelines.yaml", "demo", ["evaluate.judge_check_data=d/wp.csv"])
    assert given.evaluate.judge_check_data == REPO / "d/wp.csv"
    with pytest.raises(PipelineError, match="model names must differ: a"):
        load_config(REPO / "pipelines.yaml", "demo", ['evaluate.models=["x/a", "y/a"]'])


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "empathy_distill.cli", "evaluate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_cli_refuses_a_missing_model_or_baseline_before_any_engine(tmp_path):
    out = str(tmp_path / "eval")
    result = run_cli("--model", f"x={tmp_path / 'nope'}", "--output", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "nope" in result.stderr
    result = run_cli("--model", "teacher", "--baseline", "sft", "--output", out)
    assert result.returncode == 1 and "baseline 'sft' is not one of the models" in result.stderr


def test_outcomes_need_both_orders():
    assert judge.outcome("A", "B") == "win"  # x first: A; x second: B
    assert judge.outcome("B", "A") == "loss"
    assert judge.outcome("A", "A") == judge.outcome("B", "B") == judge.outcome("=", "=") == "tie"
    assert judge.outcome(None, "A") == "unjudged"
    pairs = [("win", "win"), ("win", "win"), ("tie", "loss"), ("loss", "loss"), ("unjudged",) * 2]
    rates = judge.win_rates([{"outcome": o, "debiased": d} for o, d in pairs])
    assert rates["pairs"] == 4 and rates["unjudged"] == 1
    assert (rates["win_rate"], rates["tie_rate"], rates["loss_rate"]) == (0.5, 0.25, 0.25)
    assert (rates["debiased_win_rate"], rates["debiased_loss_rate"]) == (0.5, 0.5)


def test_both_orders_with_a_position_biased_judge(monkeypatch):
    """A judge that always leans to "A" by 3 nats, plus a small real preference for "good"
    replies: every verdict says "A", so both orders split into ties, while the summed log-odds
    cancel the lean and find the better reply."""
    quality = {"good": 1.0, "bad": 0.0}

    def fake_ask(llm, tokenizer, items, max_len, label):
        assert max_len == 99
        out = []
        for _, a, b in items:
            if "huge" in (a, b):
                out.append(None)  # does not fit the judge's context
                continue
            margin = 3.0 + quality[a] - quality[b]
            out.append(("A" if margin > 0 else "B", margin))
        return out

    monkeypatch.setattr(judge, "ask", fake_ask)
    d = [{"role": "speaker", "text": "hi"}]
    items = [(d, "good", "bad"), (d, "bad", "good"), (d, "good", "good "), (d, "huge", "bad")]
    results = judge.both_orders(None, None, items, 99)
    assert [r["outcome"] for r in results] == ["tie", "tie", "tie", "unjudged"]
    assert [r["debiased"] for r in results] == ["win", "loss", "tie", "unjudged"]
    assert results[0]["margin"] == pytest.approx(2.0)  # (3 + 1) - (3 - 1)
    assert results[2]["x_first"] is None  # identical replies: a tie without asking
    pairs = [{"dialogue": d, "better": "good", "worse": "bad"}] * 2
    check = judge.judge_check(None, None, pairs, 99)
    assert check["agreement"] == 0.5 and check["picks_a_rate"] == 1.0
    assert check["position_consistency"] == 0.0 and check["debiased_agreement"] == 1.0


def test_rated_pairs_have_different_ratings(tmp_path):
    pairs, note = judge.rated_pairs(DATA / "wp_sample.csv", 100, seed=0)
    # ratings per row: 3 3 2 3 2 -> 6 pairs; 3 2 2 1 2 -> 7; 3 - 3 2 - (unrated) -> 2
    assert note is None and len(pairs) == 15
    assert all(p["ratings"][0] > p["ratings"][1] for p in pairs)
    again, _ = judge.rated_pairs(DATA / "wp_sample.csv", 5, seed=0)
    assert again == pairs[:5]
    none, note = judge.rated_pairs(tmp_path / "absent.csv", 10, seed=0)
    assert none == [] and "not found" in note
    assert judge.rated_pairs(DATA / "wp_sample.csv", 0, seed=0)[0] == []


def fake_metrics(names, check=True):
    model = {
        "folder": "/m",
        "examples": 2,
        "with_reference": 2,
        "bertscore_f1": 0.7,
        "bleu4": 0.05,
        "rouge_l": 0.2,
        "distinct_1": 0.5,
        "distinct_2": 0.8,
        "mean_reply_words": 12.5,
        "empty_replies": 0,
        "gate": {"passed": 0.5, "repetition": 0.5},
        "teacher_fidelity": {
            "kl_teacher_student": 1.25,
            "kl_student_teacher": 0.75,
            "reply_logprob": -2.5,
            "tokens": 40,
            "replies": 2,
            "bertscore_f1_vs_teacher": 0.6,
            "with_teacher_reply": 2,
        },
        "with_gold_emotion": 2,
        "emotion_accuracy": 0.5,
        "emotion_macro_f1": 0.333,
        "emotion_confusion": {"sad": {"sad": 1}, "proud": {"sad": 1}},
        "parameters": 134_515_008,
        "weights_mib": 513.1,
        "generated_tokens": 40,
        "tokens_per_second": 21.0,
        "peak_engine_rss_mib": 3000.0,
        "engine_startup_seconds": 40.0,
    }
    win = {"pairs": 2, "wins": 1, "ties": 1, "losses": 0, "unjudged": 0}
    win |= {"win_rate": 0.5, "tie_rate": 0.5, "loss_rate": 0.0}
    win |= {"debiased_win_rate": 1.0, "debiased_loss_rate": 0.0}
    check_figures = {
        "pairs": 4,
        "agreement": 0.625,
        "agreement_both_orders": 0.5,
        "disagreement_both_orders": 0.25,
        "position_consistency": 0.75,
        "debiased_agreement": 0.75,
        "picks_a_rate": 0.5,
        "unjudged": 0,
    }
    return {
        "input": ["x.csv"],
        "examples_read": 2,
        "rejected": 0,
        "other_split": 0,
        "examples": 2,
        "baseline": names[0],
        "judge": "/j",
        "bertscore": "MiniLM",
        "max_new_tokens": 8,
        "emotion_labels": ["proud", "sad"],
        "teacher_cache": "runs/held-out" if check else None,
        "models": {
            n: {**model, "judge_vs_baseline": None if i == 0 else win} for i, n in enumerate(names)
        },
        "judge_check": check_figures if check else None,
        "judge_check_note": None if check else "judge check skipped: rated data not found at /x",
    }


@pytest.mark.parametrize("check", [True, False])
def test_report_tables_examples_and_charts(tmp_path, check):
    examples = read_examples(DATA / "ed_sample.csv")[0][:2]
    runs = {
        "student": {"replies": ["Oh | no.", ""], "emotions": ["sad", None]},
        "teacher": {"replies": ["That is hard.\nI'm here.", "Wow!"], "emotions": ["proud", "x"]},
    }
    charts = report.write_report(
        tmp_path, fake_metrics(list(runs), check), examples, runs, n_examples=2
    )
    assert [p.name for p in charts] == ["quality.png", "win_rate.png", "cost.png", "emotion.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in charts)
    text = (tmp_path / "report.md").read_text()
    assert "| **teacher** | 0.700 | 0.500 |" in text and "134.5 M" in text
    assert "| model | passed | repetition |" in text and "| **teacher** | 0.50 | 0.50 |" in text
    assert "Oh \\| no." in text and "*(empty)*" in text and "That is hard.<br>I'm here." in text
    assert ("**0.62**" in text) if check else ("rated data not found" in text)
    if check:  # the held-out teacher cache's figures
        assert "| **student** | 1.250 | 0.750 | -2.500 | 0.600 |" in text
    else:
        assert "Not measured: no held-out teacher cache" in text
    json.dumps(fake_metrics(["a"]))  # the figures are plain JSON
    assert not list(Path(tmp_path).glob("*.tmp"))


def test_gate_shares_count_what_the_teacher_gate_would_reject():
    from empathy_distill.evaluation.evaluate import gate_shares
    from empathy_distill.shared.config import QualityConfig

    examples = read_examples(DATA / "ed_sample.csv")[0][:5]
    replies = [
        "That sounds like a hard week. Do you want to talk about it?",
        "I'm so sorry. I'm so sorry.",  # loops
        "",  # empty
        "That sounds like a hard week. Do you want to talk about it?",  # generic: said before
        "Oh wow, that is a long drive, and I would be nervous too",  # cut off mid-sentence
    ]
    reasons = ["stop", "stop", "stop", "stop", "length"]
    shares = gate_shares(examples, replies, reasons, QualityConfig())
    assert shares == {
        "passed": 0.2,
        "empty": 0.2,
        "repetition": 0.2,
        "truncated": 0.2,
        "generic": 0.2,
    }
    # the same replies, each new and complete, all pass
    clean = [
        f"Reply number {w} is its own answer to you." for w in "one two three four five".split()
    ]
    assert gate_shares(examples, clean, ["stop"] * 5, QualityConfig()) == {"passed": 1.0}


def test_paired_bootstrap_difference_and_interval():
    from empathy_distill.evaluation.metrics import mean, paired_bootstrap

    a = [0.1 * i for i in range(30)]
    assert paired_bootstrap(a, a, mean) == (0.0, 0.0, 0.0)  # one system against itself
    diff, lo, hi = paired_bootstrap([x + 0.5 for x in a], a, mean)  # a constant shift: paired,
    assert abs(diff - 0.5) < 1e-9 and abs(lo - 0.5) < 1e-9 and abs(hi - 0.5) < 1e-9  # no spread
    noisy = [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(a)]  # no shift, only noise
    diff, lo, hi = paired_bootstrap(noisy, a, mean)
    assert lo < 0 < hi and lo < diff < hi
    with pytest.raises(ValueError):
        paired_bootstrap(a, a[:-1], mean)


def test_macro_f1_by_hand():
    from empathy_distill.evaluation.metrics import macro_f1

    gold = ["sad", "sad", "proud", "afraid"]
    # sad: TP 1, FP 1 (proud read as sad), FN 1 -> 2/4; proud: 0; afraid: 2/2; picked "" too
    picked = ["sad", "", "sad", "afraid"]
    assert macro_f1(gold, picked) == pytest.approx((0.5 + 0.0 + 1.0 + 0.0) / 4)
    assert macro_f1(gold, gold) == 1.0 and macro_f1([], []) is None
    # always one label: accuracy 0.5, macro-F1 far lower
    assert macro_f1(["a", "a", "b", "c"], ["a"] * 4) == pytest.approx((2 / 3) / 3)
