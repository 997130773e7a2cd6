"""Benchmark stage one against plain vLLM generation, in one script run (not a test: machines
here are noisy, so the figure is a ratio of two runs made side by side).

    .venv/bin/python benchmarks/bench_teacher.py                 # the embedded default, demo data
    .venv/bin/python benchmarks/bench_teacher.py --limit 64 --set teacher_cache.top_k=20

Baseline: a fresh vllm.LLM over the same teacher, generating both turns of the same prompts (the
analysis, then the reply turn that holds it) with the same token limits and stop strings, no
log-probabilities, no features, no gate, nothing written; wall time from engine start to the last
output. Measured: `teacher-cache` into a fresh folder (top-k log-probabilities, the hidden states
kept and pooled into features, the quality gate and its retries, Parquet shards, manifest), same
wall-time definition; then `teacher-cache` with every gate check off into another folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plain_generation(cfg, tok, batch: list) -> tuple[float, int]:
    """Seconds and reply tokens of both turns, generated plainly (the cache's sampling)."""
    from empathy_distill.shared import prompts
    from empathy_distill.shared.models import start_vllm, stop_vllm
    from empathy_distill.stage1_teacher.teacher_cache import Teacher, generation_params

    t0 = time.time()
    llm = start_vllm(cfg.teacher.model, cfg.teacher.engine)
    teacher = Teacher(cfg, tok, llm)
    # the analysis turn, then the reply turn that holds it: each over the whole batch at once
    asked = [teacher.analysis_request(ex, ids, [], 0) for ex, ids in batch]
    outs = llm.generate([r for r, _ in asked], [p for _, p in asked], use_tqdm=True)
    replies = [
        teacher.reply_ids(ex, teacher.read_analysis(o))
        for (ex, _), o in zip(batch, outs, strict=True)
    ]
    params = generation_params(cfg, stop=prompts.REPLY_STOP)  # the cache's, without logprobs
    outs = llm.generate([{"prompt_token_ids": ids} for ids in replies], params, use_tqdm=True)
    seconds = time.time() - t0
    stop_vllm(llm)
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "pipelines.yaml"))
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from empathy_distill.shared import prompts
    from empathy_distill.shared.config import load_config
    from empathy_distill.shared.models import check_model, load_tokenizer
    from empathy_distill.stage1_teacher import quality, teacher_cache

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.overrides] + (
            [f"teacher_cache.limit={args.limit}"] if args.limit else []
        )
        cfg = load_config(
            args.config, args.pipeline, [*overrides, f"teacher_cache.output={tmp}/cache"]
        )
        # The same without the gate: what its checks and retries cost.
        gate_off = [f"teacher_cache.quality.{c}=off" for c in quality.CHECKS]
        no_gate = load_config(
            args.config, args.pipeline, [*overrides, f"teacher_cache.output={tmp}/ng", *gate_off]
        )
        check_model(cfg.teacher.model)
        tok = load_tokenizer(cfg.teacher.model)
        examples, _ = teacher_cache.read_inputs(cfg)
        examples = examples[: args.limit] if args.limit else examples
        batch = [
            (
                e,
                tok(
                    prompts.teacher_prompt(tok, e.dialogue, e.privileged), add_special_tokens=False
                )["input_ids"],
            )
            for e in examples
        ]
        base_s, base_tokens = plain_generation(cfg, tok, batch)
        summary = teacher_cache.main(cfg)
        summary_ng = teacher_cache.main(no_gate)

    cache_s = summary["wall_seconds"]
    result = {
        "examples": len(batch),
        "top_k": cfg.teacher_cache.top_k,
        "plain_vllm_seconds": round(base_s, 1),
        "plain_vllm_generated_tokens": base_tokens,
        "teacher_cache_seconds": cache_s,
        "teacher_cache_generated_tokens": summary["generated_tokens"],
        "engine_startup_seconds": summary["engine_startup_seconds"],
        # where the cache's time went: generation with top-k (and the kept hidden states), then
        # pooling the kept states into features
        "generate_seconds": summary["generate_seconds"],
        "feature_seconds": summary["feature_seconds"],
        "ratio": round(cache_s / base_s, 3),
        "accepted_first_try": summary["accepted_first_try"],
        "accepted_after_retry": summary["accepted_after_retry"],
        "rejected_by_gate": sum(v for k, v in summary.items() if k.startswith("rejected_")),
        "teacher_cache_without_gate_seconds": summary_ng["wall_seconds"],
        "ratio_without_gate": round(summary_ng["wall_seconds"] / base_s, 3),
        "gate_cost_ratio": round(cache_s / summary_ng["wall_seconds"], 3),
        "bytes_per_reply_token": summary["bytes_per_reply_token"],
    }
    print("\n| figure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key.replace('_', ' ')} | {value} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
