"""Benchmark stage one against plain vLLM generation, in one script run (not a test: machines
here are noisy, so the figure is a ratio of two runs made side by side).

    .venv/bin/python benchmarks/bench_teacher.py                 # the embedded default, demo data
    .venv/bin/python benchmarks/bench_teacher.py --limit 64 --set teacher_cache.top_k=20

Baseline: a fresh vllm.LLM over the same teacher, generating for the same prompts with the same
token limits and stop strings, no log-probabilities, no features, nothing written; wall time from
engine start to the last output. Measured: `teacher-cache` into a fresh folder (top-k
log-probabilities, the hidden states kept and pooled into features, Parquet shards, manifest),
same wall-time definition; then `teacher-cache` with `features=false` into another folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plain_generation(cfg, prompt_ids: list[list[int]]) -> tuple[float, int]:
    from vllm import LLM

    from stage1_teacher.teacher_cache import generation_params

    t0 = time.time()
    llm = LLM(str(cfg.teacher.model), **cfg.teacher.engine)
    params = generation_params(cfg)  # the cache's settings, without logprobs
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=True)
    seconds = time.time() - t0
    llm.llm_engine.engine_core.shutdown()
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "pipelines.yaml"))
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from shared import prompts
    from shared.config import load_config
    from shared.models import ensure_model, load_tokenizer
    from stage1_teacher import teacher_cache

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.overrides] + (
            [f"teacher_cache.limit={args.limit}"] if args.limit else []
        )
        cfg = load_config(
            args.config, args.pipeline, [*overrides, f"teacher_cache.output={tmp}/cache"]
        )
        # The same without features: what top-k, shards and manifest cost alone.
        no_features = load_config(
            args.config,
            args.pipeline,
            [*overrides, f"teacher_cache.output={tmp}/cache-nf", "teacher_cache.features=false"],
        )
        ensure_model(cfg.teacher.model)
        tok = load_tokenizer(cfg.teacher.model)
        examples, _ = teacher_cache.read_inputs(cfg)
        examples = examples[: args.limit] if args.limit else examples
        prompt_ids = [
            tok(prompts.teacher_prompt(tok, e.dialogue, e.privileged), add_special_tokens=False)[
                "input_ids"
            ]
            for e in examples
        ]
        base_s, base_tokens = plain_generation(cfg, prompt_ids)
        summary = teacher_cache.main(cfg)
        summary_nf = teacher_cache.main(no_features)

    cache_s = summary["wall_seconds"]
    result = {
        "examples": len(prompt_ids),
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
        "teacher_cache_without_features_seconds": summary_nf["wall_seconds"],
        "ratio_without_features": round(summary_nf["wall_seconds"] / base_s, 3),
        "bytes_per_reply_token": summary["bytes_per_reply_token"],
    }
    print("\n| figure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key.replace('_', ' ')} | {value} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
