"""The reasoning prompt judged by what the teacher writes: `teacher-cache` (two-turn reasoning
prompt + quality gate) against the same teacher's plain chat answer, on the same dialogues.

    .venv/bin/python benchmarks/prompt_quality.py --input data/demo/train.csv
    .venv/bin/python benchmarks/prompt_quality.py --input PATH/wp_empathy/dataset.csv --sample 200

`--sample N` draws N examples at random (seeded) from the input, leaving out the first
`--skip` (default 40) in file order: the ones the prompt was looked at on while it was written.
Plain: `pipeline evaluate`'s student prompt (the dialogue as chat turns) through the teacher,
greedy, the same token limit and stop, every reply kept. Both sides are scored on BERTScore-F1
against the dataset's reference (local MiniLM) and Distinct-2; the plain replies also go through
the gate's checks, for the rates beside the cache's. The difference on the same examples comes
with a paired bootstrap's 95% interval. Prints a Markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def held_out_jsonl(examples, path: Path) -> None:
    """The sampled examples in the project's JSONL format, so `teacher-cache` reads them as is."""
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            record = {
                "dialogue": ex.dialogue,
                "privileged": ex.privileged,
                "emotion": ex.emotion,
                "reference": ex.reference,
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def plain_replies(cfg, examples) -> tuple[list[str], list[str]]:
    """The teacher's plain chat answers (greedy) and their finish reasons."""
    from empathy_distill.shared import prompts
    from empathy_distill.shared.models import load_tokenizer, start_vllm, stop_vllm
    from empathy_distill.stage1_teacher.teacher_cache import generation_params

    tok = load_tokenizer(cfg.teacher.model)
    llm = start_vllm(cfg.teacher.model, cfg.teacher.engine)
    ids = [
        {
            "prompt_token_ids": tok(
                prompts.student_prompt(tok, e.dialogue), add_special_tokens=False
            )["input_ids"]
        }
        for e in examples
    ]
    outs = llm.generate(ids, generation_params(cfg, stop=prompts.REPLY_STOP), use_tqdm=True)
    stop_vllm(llm)
    return [o.outputs[0].text.strip() for o in outs], [o.outputs[0].finish_reason for o in outs]


def bertscores(replies: list[str], references: list[str], encoder) -> list[float]:
    """Each reply's BERTScore-F1 against its reference (pairs without a reference left out)."""
    from empathy_distill.evaluation import metrics

    pairs = [(r, ref) for r, ref in zip(replies, references, strict=True) if ref]
    vectors = encoder.embed([r for r, _ in pairs] + [ref for _, ref in pairs])
    n = len(pairs)
    return [metrics.bertscore_f1(vectors[i], vectors[n + i]) for i in range(n)]


def scores(replies: list[str], bert: list[float]) -> dict[str, float]:
    """The table's figures for one side: `bert` is its `bertscores`."""
    from empathy_distill.evaluation import metrics

    tokens = [metrics.tokenize(r) for r in replies]
    same = sum(c - 1 for c in Counter(r.lower().strip() for r in replies).values() if c > 1)
    return {
        "bertscore_f1": round(metrics.mean(bert) or 0.0, 4),
        "distinct_2": round(metrics.distinct(tokens, 2), 4),
        "identical_share": round(same / len(replies), 4) if replies else 0.0,
        "mean_words": round(sum(map(len, tokens)) / max(len(tokens), 1), 1),
    }


def paired(ours: list[str], theirs: list[str], bert_ours: list[float], bert_theirs: list[float]):
    """Ours minus theirs on the same examples, with a paired bootstrap's 95% interval: whether
    "no worse" is a difference the sample can see (`metrics.paired_bootstrap`)."""
    from empathy_distill.evaluation import metrics

    out = {
        "bertscore_f1": metrics.paired_bootstrap(
            bert_ours, bert_theirs, lambda v: metrics.mean(v) or 0.0
        ),
        "distinct_2": metrics.paired_bootstrap(
            [metrics.tokenize(r) for r in ours],
            [metrics.tokenize(r) for r in theirs],
            lambda t: metrics.distinct(t, 2),
        ),
    }
    return {k: [round(x, 4) for x in v] for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--config", default=str(REPO / "pipelines.yaml"))
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--sample", type=int, default=None, help="N random examples (seeded)")
    parser.add_argument("--skip", type=int, default=40, help="leave out the first N (tuned on)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--save", type=Path, default=None, help="write both sides' replies here")
    args = parser.parse_args()

    from empathy_distill.evaluation.metrics import TokenEncoder
    from empathy_distill.shared.config import load_config
    from empathy_distill.shared.readers import read_examples
    from empathy_distill.stage1_teacher import quality, teacher_cache
    from empathy_distill.stage1_teacher.quality import check_reply

    examples, _ = read_examples(args.input)
    if args.sample:
        pool = examples[args.skip :]
        examples = random.Random(args.seed).sample(pool, min(args.sample, len(pool)))
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "held_out.jsonl"
        held_out_jsonl(examples, source)
        cfg = load_config(
            args.config,
            args.pipeline,
            [
                *args.overrides,
                f"teacher_cache.inputs=[{source}]",
                f"teacher_cache.output={tmp}/cache",
                "teacher_cache.features=false",
            ],
        )
        summary = teacher_cache.main(cfg)
        import pyarrow.parquet as pq

        rows = [
            r
            for p in sorted(Path(tmp, "cache").glob("shard-*.parquet"))
            for r in pq.read_table(p).to_pylist()
        ]
        cached = teacher_cache.read_inputs(cfg)[0]  # JSONL ids, in the sample's order
    plain, finish = plain_replies(cfg, cached)

    q = cfg.teacher_cache.quality
    accepted, plain_fail = Counter(), Counter()
    plain_ok = []
    for ex, reply, reason in zip(cached, plain, finish, strict=True):
        found = check_reply(
            reply,
            q,
            finish_reason=reason,
            privileged=ex.privileged,
            speaker=quality.speaker_text(ex.dialogue),
            accepted=accepted,
        )
        for check, _ in found:
            plain_fail[check] += 1
        if quality.verdict(found, q) == "accept":
            quality.remember(accepted, reply, q)
            plain_ok.append(ex.example_id)
    refs = {ex.example_id: ex.reference or "" for ex in cached}
    encoder = TokenEncoder()
    by_id = {r["example_id"]: r for r in rows}
    both = [ex.example_id for ex in cached if ex.example_id in by_id]
    plain_by_id = dict(zip([ex.example_id for ex in cached], plain, strict=True))
    n = len(cached)
    reasoning = [by_id[i]["teacher_response"] for i in both]
    plain_same = [plain_by_id[i] for i in both]
    # both sides against the same references (examples without one left out of both)
    bert_reasoning = bertscores(reasoning, [refs[i] for i in both], encoder)
    bert_plain = bertscores(plain_same, [refs[i] for i in both], encoder)
    result = {
        "examples": n,
        "reasoning_accepted": len(rows),
        "reasoning_accepted_first_try": summary["accepted_first_try"],
        "reasoning_accepted_after_retry": summary["accepted_after_retry"],
        "reasoning_rejected": {k: v for k, v in summary.items() if k.startswith("rejected_")},
        "reasoning_analysis_parsed": round(
            sum(r["teacher_parse_ok"] for r in rows) / max(len(rows), 1), 3
        ),
        "reasoning_empty_rows": sum(not r["response_token_ids"] for r in rows),
        "reasoning_repeating_a_sentence": sum(
            quality.repeated_sentence(r["teacher_response"]) is not None for r in rows
        ),
        "plain_would_pass_gate": len(plain_ok),
        "plain_failures": dict(plain_fail),
        "reasoning": scores(reasoning, bert_reasoning),
        "plain_same_examples": scores(plain_same, bert_plain),
        "plain_all": scores(
            plain, bertscores(plain, [refs[ex.example_id] for ex in cached], encoder)
        ),
        # [difference, 2.5%, 97.5%]: the reasoning side minus the plain side, same examples
        "reasoning_minus_plain": paired(reasoning, plain_same, bert_reasoning, bert_plain),
    }
    if args.save:
        with args.save.open("w", encoding="utf-8") as f:
            for ex in cached:
                row = by_id.get(ex.example_id)
                f.write(
                    json.dumps(
                        {
                            "speaker": ex.dialogue[-1]["text"],
                            "reference": ex.reference,
                            "reasoning": row and row["teacher_reasoning"],
                            "reply": row and row["teacher_response"],
                            "plain": plain_by_id[ex.example_id],
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    print("\n| | reasoning prompt + gate (accepted) | plain prompt, same examples | plain, all |")
    print("|---|---|---|---|")
    for key in result["reasoning"]:
        values = [result[s][key] for s in ("reasoning", "plain_same_examples", "plain_all")]
        print(f"| {key.replace('_', ' ')} | " + " | ".join(map(str, values)) + " |")
    for key, (diff, lo, hi) in result["reasoning_minus_plain"].items():
        print(f"reasoning - plain, {key}: {diff:+.4f} (95% paired bootstrap {lo:+.4f}..{hi:+.4f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
