"""Benchmark stage one against plain vLLM generation, in one script run (not a test: machines
here are noisy, so the figure is a ratio of two runs made side by side).

    .venv/bin/python benchmarks/bench_teacher.py                 # the embedded default, demo data
    .venv/bin/python benchmarks/bench_teacher.py --limit 64 --set teacher_cache.top_k=20
    .venv/bin/python benchmarks/bench_teacher.py --repeat 3     # the same-work ratio, de-noised
    .venv/bin/python benchmarks/bench_teacher.py --no-gated     # without the gated run

Baseline: a fresh vllm.LLM over the same teacher, generating both turns of the same prompts (the
analysis, then the reply turn that holds it) with the same token limits and stop strings, no
log-probabilities, no features, no gate, nothing written; wall time from loading the tokenizer
and reading the inputs (where the cache's clock starts too) to the engine's stop. Measured:
`teacher-cache` into a fresh folder with every gate check off (top-k log-probabilities, the
hidden states kept and pooled into features, Parquet shards, manifest: what the cache itself
costs), its own wall time (the whole job, engine start and stop included); then `teacher-cache`
with the gate and its retries. Every run is a new process that imports vLLM and the project
before its clock starts, as a user's job is one process. `--repeat N` alternates the first two N
times and takes the ratio of the fastest of each side: this machine's noise moves single runs by
10-20%, and only ever adds time. The gated run is made once, after them, and compared with the
fastest of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare() -> None:
    """What a run's child imports before its clock starts (both sides alike): vLLM's engine,
    torch, transformers and the project. A user's job pays these once; here every run is a new
    process (each side would otherwise find what earlier runs left behind). `import vllm` alone
    is lazy: the engine's modules load with `vllm.LLM` (3-6 s here)."""
    from transformers import AutoTokenizer  # noqa: F401
    from vllm import LLM  # noqa: F401
    from vllm.engine.arg_utils import EngineArgs  # noqa: F401

    from empathy_distill.stage1_teacher import teacher_cache  # noqa: F401


def plain_generation(config: str, pipeline: str, overrides: list[str]) -> tuple[float, int, int]:
    """Seconds and reply tokens of both turns, generated plainly (the cache's sampling), and
    the number of examples."""
    prepare()
    from empathy_distill.shared import prompts
    from empathy_distill.shared.config import load_config
    from empathy_distill.shared.models import load_tokenizer, start_vllm, stop_vllm
    from empathy_distill.stage1_teacher import teacher_cache
    from empathy_distill.stage1_teacher.teacher_cache import Teacher, generation_params

    cfg = load_config(config, pipeline, overrides)
    # From here as `teacher-cache`'s clock: the tokenizer, the inputs and their prompts are work
    # that both sides do.
    t0 = time.time()
    tok = load_tokenizer(cfg.teacher.model)
    examples, _ = teacher_cache.read_inputs(cfg)
    limit = cfg.teacher_cache.limit
    batch = [
        (e, tok(prompts.teacher_prompt(tok, e.dialogue, e.privileged), add_special_tokens=False))
        for e in (examples[:limit] if limit else examples)
    ]
    batch = [(e, encoded["input_ids"]) for e, encoded in batch]
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
    # The engine's stop counts, as its start does: `teacher-cache` pays both (vLLM 0.32's
    # shutdown takes ~5 s here: its engine core outlives the grace period and is killed).
    stop_vllm(llm)
    seconds = time.time() - t0
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs), len(batch)


def cache_run(config: str, pipeline: str, overrides: list[str]) -> dict:
    """`teacher-cache` (its own wall time: the whole job, engine start and stop included)."""
    prepare()
    from empathy_distill.shared.config import load_config
    from empathy_distill.stage1_teacher import teacher_cache

    return teacher_cache.main(load_config(config, pipeline, overrides))


def apart(fn, *args):
    """`fn(*args)` in a new process (spawned: nothing inherited), its result back."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "pipelines.yaml"))
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="plain generation and the cache without the gate, alternated N times",
    )
    parser.add_argument(
        "--gated",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then the cache with the gate, once (--no-gated: the same-work ratio only)",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    from empathy_distill.shared.config import load_config
    from empathy_distill.shared.models import check_model
    from empathy_distill.stage1_teacher import quality

    overrides = [*args.overrides] + ([f"teacher_cache.limit={args.limit}"] if args.limit else [])
    cfg = load_config(args.config, args.pipeline, overrides)
    check_model(cfg.teacher.model)
    # The same without the gate: what the cache itself costs, and what the gate adds.
    gate_off = [f"teacher_cache.quality.{c}=off" for c in quality.CHECKS]
    with tempfile.TemporaryDirectory() as tmp:
        # Plain generation and the cache without the gate, alternated `--repeat` times: this
        # machine's noise slows single runs by 10-20%, so the ratio is taken of the fastest run
        # of each side (noise only ever adds time), with the medians' ratio beside it.
        plain, ungated, summaries = [], [], []
        for i in range(args.repeat):
            base_s, base_tokens, n = apart(plain_generation, args.config, args.pipeline, overrides)
            plain.append(round(base_s, 1))
            out = f"teacher_cache.output={tmp}/ng{i}"
            summary_ng = apart(cache_run, args.config, args.pipeline, [*overrides, out, *gate_off])
            ungated.append(summary_ng["wall_seconds"])
            summaries.append(summary_ng)
            print(
                f"pair {i + 1}: plain {base_s:.1f} s, cache without the gate "
                f"{summary_ng['wall_seconds']:.1f} s",
                flush=True,
            )
        summary = None
        if args.gated:
            out = f"teacher_cache.output={tmp}/cache"
            summary = apart(cache_run, args.config, args.pipeline, [*overrides, out])

    base_s = min(plain)
    fastest = min(summaries, key=lambda s: s["wall_seconds"])
    result = {
        "examples": n,
        "top_k": cfg.teacher_cache.top_k,
        "plain_vllm_seconds": plain,
        "plain_vllm_generated_tokens": base_tokens,
        "teacher_cache_without_gate_seconds": ungated,
        "ratio_without_gate": round(min(ungated) / base_s, 3),  # fastest over fastest
        "ratio_without_gate_medians": round(
            statistics.median(ungated) / statistics.median(plain), 3
        ),
        # where the fastest cache's time went: the engine start, generation with top-k (and
        # the kept hidden states), pooling the kept states into features
        **{
            k: fastest[k] for k in ("engine_startup_seconds", "generate_seconds", "feature_seconds")
        },
        "bytes_per_reply_token": fastest["bytes_per_reply_token"],
    }
    if summary is not None:
        cache_s = summary["wall_seconds"]
        result |= {
            "teacher_cache_seconds": cache_s,
            "teacher_cache_generated_tokens": summary["generated_tokens"],
            "ratio": round(cache_s / base_s, 3),
            "accepted_first_try": summary["accepted_first_try"],
            "accepted_after_retry": summary["accepted_after_retry"],
            "rejected_by_gate": sum(v for k, v in summary.items() if k.startswith("rejected_")),
            "gate_cost_ratio": round(cache_s / min(ungated), 3),
        }
    print("\n| figure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key.replace('_', ' ')} | {value} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
