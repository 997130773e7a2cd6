"""`pipeline evaluate`: every model answers held-out dialogues; metrics, LLM judge, report.

    pipeline evaluate --pipeline demo
    pipeline evaluate --input data/demo/test.csv --model teacher \
        --model student=models/smollm2-135m-student-6l --model runs/demo/student --output /tmp/eval

For each model, one vLLM engine at a time (greedy decoding; a model of the running engine's
architecture has its weights loaded into it, see `Engines`):
  1. replies: the student prompt (the dialogue only, `prompts.student_prompt`), as deployed;
  2. emotion: PRIDE's reasoning prompt without privileged notes, primed with "Emotion:", a few
     tokens, parsed with `prompts.parse_teacher_output`; a model that cannot follow it scores low;
  3. cost: parameters, generated reply tokens per second, peak RSS of the engine's processes.
Then the judge (by default the teacher, whose engine is kept for it when the teacher is one of the
models) compares every model's replies with the baseline's in both orders (evaluation/judge.py) and
checks itself against human ratings. Reference metrics (BLEU-4, ROUGE-L, BERTScore-F1) count the
examples that have a reference. Output: metrics.json, replies.jsonl, report.md, PNG charts,
rejects.jsonl and the resolved config.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from empathy_distill.evaluation import fidelity, judge, metrics, report
from empathy_distill.shared import console, prompts
from empathy_distill.shared.config import (
    MODEL_KEYWORDS,
    PipelineConfig,
    QualityConfig,
    open_output,
    split_model_spec,
    write_resolved,
)
from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.files import atomic_write_text
from empathy_distill.shared.models import (
    WEIGHT_SWAP,
    check_engine_settings,
    check_model,
    engine_key,
    load_tokenizer,
    start_vllm,
    stop_vllm,
    swap_weights,
    tokenizer_fingerprint,
)
from empathy_distill.shared.readers import ED_EMOTIONS, Example, Reject, read_examples
from empathy_distill.shared.schema import MANIFEST
from empathy_distill.stage1_teacher import quality

# ----------------------------------------------------------------------------- setup


def model_folders(cfg: PipelineConfig) -> dict[str, Path]:
    """Model name -> folder, in report order; the embedded default's folders are built if needed."""
    keyword = {"teacher": cfg.teacher.model, "student": cfg.student.model}
    folders = {}
    for spec in cfg.evaluate.models:
        name, target = split_model_spec(spec)
        folders[name] = check_model(keyword[target] if target in MODEL_KEYWORDS else Path(target))
    return folders


def judge_folder(cfg: PipelineConfig) -> Path:
    j = cfg.evaluate.judge
    keyword = {"teacher": cfg.teacher.model, "student": cfg.student.model}
    return check_model(keyword.get(j) or Path(j))


def read_inputs(cfg: PipelineConfig) -> tuple[list[Example], list[Reject], int]:
    """Examples (of `evaluate.split`, if set), rejects, and the count of other-split examples."""
    ev = cfg.evaluate
    fmt = None if ev.format == "auto" else ev.format
    examples, rejects = [], []
    for path in ev.inputs:
        ex, rej = read_examples(Path(path), fmt)
        examples += ex
        rejects += rej
    kept = [e for e in examples if ev.split is None or e.split == ev.split]
    return kept, rejects, len(examples) - len(kept)


def fit_examples(cfg, tokenizers: dict, examples: list[Example], rejects: list[Reject]):
    """Drop duplicates and dialogues too long for any model's context (they become rejects)."""
    ev = cfg.evaluate
    max_len = engine_settings(cfg).get("max_model_len", 2048)
    kept, seen = [], set()
    for ex in examples:
        if ex.example_id in seen:
            continue
        seen.add(ex.example_id)
        need = 0
        for tok in tokenizers.values():
            reply = tok(prompts.student_prompt(tok, ex.dialogue), add_special_tokens=False)
            emo = tok(prompts.teacher_prompt(tok, ex.dialogue, {}), add_special_tokens=False)
            need = max(
                need,
                len(reply["input_ids"]) + ev.max_new_tokens,
                len(emo["input_ids"]) + ev.emotion_max_tokens,
            )
        if need > max_len:
            reason = f"dialogue too long: needs {need} tokens > max_model_len {max_len}"
            rejects.append(Reject(ex.origin, reason, json.dumps(ex.dialogue)[:500]))
            continue
        kept.append(ex)
    return kept[: ev.limit] if ev.limit else kept


def engine_settings(cfg: PipelineConfig) -> dict[str, Any]:
    check_engine_settings(cfg.teacher.engine)
    check_engine_settings(cfg.evaluate.engine, "evaluate.engine")
    return {**cfg.teacher.engine, **cfg.evaluate.engine}


def count_parameters(folder: Path) -> int:
    """Parameters from the safetensors headers (shapes only; no weights are loaded)."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, entry in header.items():
            if key != "__metadata__":
                n = 1
                for dim in entry["shape"]:
                    n *= dim
                total += n
    return total


class PeakRSS:
    """Samples the summed RSS of this process's children (vLLM's engine-core and worker
    processes) in a background thread; `peak_mib` is the highest sum seen."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)


# ----------------------------------------------------------------------------- models


class Engines:
    """At most one vLLM engine at a time. A model whose `engine_key` is the running engine's is
    served from it with its weights swapped in (`evaluate.reuse_engine`; a fraction of a second
    against 20-45 s for a new engine); any other model gets a new engine."""

    def __init__(self, cfg: PipelineConfig):
        self.settings = engine_settings(cfg)
        self.swap = cfg.evaluate.reuse_engine and "worker_extension_cls" not in self.settings
        if self.swap:
            self.settings["worker_extension_cls"] = WEIGHT_SWAP
        self.llm = None
        self.key: str | None = None
        self.folder: Path | None = None  # whose weights the engine holds

    def serve(self, folder: Path, key: str):
        """An engine holding `folder`'s weights, and whether it is the engine that was running
        (its weights swapped in, or already `folder`'s) rather than a new one."""
        folder = folder.resolve()
        if self.llm is not None and self.folder == folder:
            return self.llm, True
        if self.llm is not None and self.swap and key == self.key:
            try:
                swap_weights(self.llm, folder)
                self.folder = folder
                return self.llm, True
            except Exception as e:  # any failure to swap: a new engine is the safe way
                console.say(
                    f"evaluate: could not load {folder} into the running engine "
                    f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); "
                    "starting a new one"
                )
        self.stop()
        self.llm = start_vllm(folder, self.settings, section="evaluate.engine")
        self.key, self.folder = key, folder
        return self.llm, False

    def stop(self) -> None:
        stop_vllm(self.llm)
        self.llm, self.key, self.folder = None, None, None


def generate(
    llm, tokenizer, texts: list[str], max_tokens: int, label: str, **settings
) -> tuple[list, int, list]:
    """Greedy generation from prompt texts (`settings`: more SamplingParams); returns (decoded
    texts, generated token count, finish reasons)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **settings)
    ids = [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
    outs = llm.generate(ids, params, use_tqdm=judge.progress(label))
    return (
        [o.outputs[0].text for o in outs],
        sum(len(o.outputs[0].token_ids) for o in outs),
        [o.outputs[0].finish_reason for o in outs],
    )


def run_model(cfg, llm, tokenizer, examples: list[Example], name: str) -> dict[str, Any]:
    """Replies (student prompt), and the emotion each dialogue's speaker feels (reasoning
    prompt, no privileged notes), picked from the closed label set (`emotion_labels`) by
    constrained decoding; None for a dialogue whose gold label is outside the set."""
    from vllm.sampling_params import StructuredOutputsParams

    ev = cfg.evaluate
    t0 = time.time()
    texts = [prompts.student_prompt(tokenizer, ex.dialogue) for ex in examples]
    replies, n_tokens, finished = generate(
        llm, tokenizer, texts, ev.max_new_tokens, f"{name} replies"
    )
    seconds = time.time() - t0
    labels = emotion_labels(cfg)
    scored = [i for i, ex in enumerate(examples) if ex.emotion in labels]
    emotions: list[str | None] = [None] * len(examples)
    if scored:
        texts = [prompts.teacher_prompt(tokenizer, examples[i].dialogue, {}) for i in scored]
        # " afraid" etc.: the prompt ends "Emotion:", and the label is the next word
        choice = StructuredOutputsParams(choice=[f" {label}" for label in labels])
        named, _, _ = generate(
            llm,
            tokenizer,
            texts,
            ev.emotion_max_tokens,
            f"{name} emotions",
            structured_outputs=choice,
        )
        for i, label in zip(scored, named, strict=True):
            emotions[i] = label.strip() or None
    return {
        "replies": [r.strip() for r in replies],
        "finish_reasons": finished,
        "emotions": emotions,
        "generated_tokens": n_tokens,
        "generation_seconds": round(seconds, 2),
    }


def held_out_cache(cfg: PipelineConfig, tokenizers: dict) -> list[dict] | None:
    """The rows of `evaluate.teacher_cache`, checked before any engine starts: the cache as
    stage two checks one, and every model's tokenizer against it."""
    folder = cfg.evaluate.teacher_cache
    if folder is None:
        return None
    if not (folder / MANIFEST).is_file():
        raise PipelineError(
            f"evaluate.teacher_cache: no teacher cache at {folder}; make it with `pipeline "
            f"teacher-cache --held-out --pipeline {cfg.name}` (`pipeline run` does), or unset it"
        )
    manifest, rows = fidelity.read_cache(folder)
    if not rows:
        raise PipelineError(f"{folder}: the teacher cache holds no reply to compare with")
    fingerprint = manifest["settings"]["tokenizer_fingerprint"]
    for name, tok in tokenizers.items():
        if tokenizer_fingerprint(tok) != fingerprint:
            raise PipelineError(
                f"model {name}: its tokenizer differs from {folder}'s, so its distribution "
                "cannot be compared with the cached top-k; leave evaluate.teacher_cache unset"
            )
    return rows


def teacher_fidelity(run, encoder, with_teacher: list[int], teacher_vectors):
    """The model's closeness to the teacher on the held-out cache (`fidelity.FIGURES`), and
    BERTScore-F1 of its own replies against the teacher's; None without a held-out cache."""
    if "fidelity" not in run:
        return None
    vectors = encoder.embed([run["replies"][i] for i in with_teacher])
    return {
        **run["fidelity"],
        "bertscore_f1_vs_teacher": metrics.mean(
            [metrics.bertscore_f1(c, r) for c, r in zip(vectors, teacher_vectors, strict=True)]
        ),
        "with_teacher_reply": len(with_teacher),
    }


def emotion_labels(cfg: PipelineConfig) -> list[str]:
    labels = cfg.evaluate.emotion_labels
    return list(ED_EMOTIONS) if labels is None else [x.strip().lower() for x in labels]


# ----------------------------------------------------------------------------- scoring


def gate_shares(
    examples: list[Example], replies: list[str], finish_reasons: list, q: QualityConfig
) -> dict[str, float]:
    """A model's replies through the teacher cache's quality gate (stage1_teacher/quality.py,
    the same checks and settings): the share that passes every check, and the share failing
    each one. There are no retries here: every reply counts, and `generic` and `stock` compare
    each reply with the model's earlier replies in the run. A student that loops or answers
    everyone alike shows up here, where BERTScore against a reference hides it."""
    accepted: Counter = Counter()
    failed: Counter = Counter()
    passed = 0
    for ex, reply, reason in zip(examples, replies, finish_reasons, strict=True):
        found = quality.check_reply(
            reply,
            q,
            finish_reason=reason,
            privileged=ex.privileged,
            dialogue=prompts.render_dialogue(ex.dialogue),
            speaker=quality.speaker_text(ex.dialogue),
            accepted=accepted,
        )
        quality.remember(accepted, reply, q)
        failed.update({check for check, _ in found})
        passed += not found
    n = max(len(replies), 1)
    return {"passed": passed / n, **{c: failed[c] / n for c in quality.CHECKS if c in failed}}


def score(
    examples: list[Example],
    run: dict[str, Any],
    encoder,
    ref_vectors,
    q: QualityConfig,
    labels: list[str],
) -> dict[str, Any]:
    """Every metric of one model's replies (pure functions from evaluation/metrics.py), and
    its emotion recognition on the dialogues whose gold label is one of `labels`."""
    tokens = [metrics.tokenize(r) for r in run["replies"]]
    with_ref = [i for i, ex in enumerate(examples) if ex.reference]
    refs = {i: metrics.tokenize(examples[i].reference) for i in with_ref}
    reply_vectors = encoder.embed([run["replies"][i] for i in with_ref])
    gold = [i for i, ex in enumerate(examples) if ex.emotion in labels]
    truth = [examples[i].emotion for i in gold]
    named = [run["emotions"][i] or "" for i in gold]
    confusion: dict[str, Counter] = {}
    for t, n in zip(truth, named, strict=True):
        confusion.setdefault(t, Counter())[n] += 1
    return {
        "examples": len(examples),
        "with_reference": len(with_ref),
        "bertscore_f1": metrics.mean(
            [metrics.bertscore_f1(c, r) for c, r in zip(reply_vectors, ref_vectors, strict=True)]
        ),
        "bleu4": metrics.mean([metrics.bleu4(tokens[i], refs[i]) for i in with_ref]),
        "rouge_l": metrics.mean([metrics.rouge_l(tokens[i], refs[i]) for i in with_ref]),
        "distinct_1": metrics.distinct(tokens, 1),
        "distinct_2": metrics.distinct(tokens, 2),
        "mean_reply_words": metrics.mean([len(t) for t in tokens]),
        "empty_replies": sum(not r for r in run["replies"]),
        "gate": gate_shares(examples, run["replies"], run["finish_reasons"], q),
        "with_gold_emotion": len(gold),
        "emotion_accuracy": metrics.mean(
            [float(n == t) for n, t in zip(named, truth, strict=True)]
        ),
        "emotion_macro_f1": metrics.macro_f1(truth, named),
        "emotion_confusion": {t: dict(c) for t, c in sorted(confusion.items())},
    }


# ----------------------------------------------------------------------------- main


def main(cfg: PipelineConfig) -> dict[str, Any]:
    t_start = time.time()
    ev = cfg.evaluate
    out = open_output(ev.output, "evaluate.output")

    # Everything that can fail without an engine fails here, before the first engine starts.
    examples, rejects, other_split = read_inputs(cfg)
    n_read = len(examples) + len(rejects) + other_split
    folders = model_folders(cfg)
    baseline = ev.baseline or next(iter(folders))
    if baseline not in folders:
        raise PipelineError(
            f"baseline {baseline!r} is not one of the models ({', '.join(folders)}); "
            "pass --baseline NAME or set evaluate.baseline"
        )
    judge_dir = judge_folder(cfg)
    tokenizers = {name: load_tokenizer(folder) for name, folder in folders.items()}
    judge_tok = load_tokenizer(judge_dir)
    examples = fit_examples(cfg, tokenizers, examples, rejects)
    if not examples:
        raise PipelineError(f"no usable dialogues in {', '.join(map(str, ev.inputs))}")
    check_pairs, check_note = judge.rated_pairs(ev.judge_check_data, ev.judge_check_pairs, ev.seed)
    held_out = held_out_cache(cfg, tokenizers)
    write_resolved(cfg, out)  # the run is accepted: only now does its config describe the output
    max_len = engine_settings(cfg).get("max_model_len", 2048)

    # One engine at a time. Models of one architecture go one after another, so that each after
    # the first is served from the running engine with its weights swapped in; the judge's
    # architecture goes last, the judge's own folder last of all, and that engine judges.
    keys = {name: engine_key(folders[name], tokenizers[name]) for name in folders}
    judge_key = engine_key(judge_dir, judge_tok)
    first = {key: i for i, key in reversed(list(enumerate(keys.values())))}
    order = sorted(
        folders,
        key=lambda n: (
            keys[n] == judge_key,
            first[keys[n]],
            folders[n].resolve() == judge_dir.resolve(),
        ),
    )
    need_judge = len(folders) > 1 or bool(check_pairs)
    engines = Engines(cfg)
    runs: dict[str, dict[str, Any]] = {}
    try:
        for name in order:
            console.say(f"evaluate: {name} ({folders[name]}) on {len(examples)} dialogues")
            with PeakRSS() as mem:
                t0 = time.time()
                llm, reused = engines.serve(folders[name], keys[name])
                startup = time.time() - t0
                runs[name] = run_model(cfg, llm, tokenizers[name], examples, name)
            runs[name].update(
                parameters=count_parameters(folders[name]),
                weights_mib=round(
                    sum(f.stat().st_size for f in folders[name].glob("*.safetensors")) / 2**20, 1
                ),
                engine_startup_seconds=round(startup, 1),
                engine_reused=reused,
                peak_engine_rss_mib=mem.peak_mib,
            )

        runs = {name: runs[name] for name in folders}  # back to report order
        t_judge = time.time()
        verdicts = {}
        if need_judge:
            llm, _ = engines.serve(judge_dir, judge_key)
            console.say(f"evaluate: judging with {judge_dir}")
        for name in folders:
            if name != baseline:
                items = [
                    (ex.dialogue, x, y)
                    for ex, x, y in zip(
                        examples, runs[name]["replies"], runs[baseline]["replies"], strict=True
                    )
                ]
                verdicts[name] = judge.both_orders(
                    llm, judge_tok, items, max_len, f"judge {name} vs {baseline}"
                )
        check = judge.judge_check(llm, judge_tok, check_pairs, max_len) if check_pairs else None
    finally:
        engines.stop()
    judge_seconds = time.time() - t_judge

    # Teacher fidelity with transformers, once no engine holds memory (on a GPU, vLLM keeps
    # most of it for its KV cache while it runs).
    for name in folders if held_out is not None else []:
        t0 = time.time()
        runs[name]["fidelity"] = fidelity.fidelity(folders[name], held_out, cfg.distill.max_seq_len)
        console.say(
            f"evaluate: {name} against the teacher's held-out replies "
            f"({time.time() - t0:.0f} s): KL(teacher||{name}) "
            f"{runs[name]['fidelity']['kl_teacher_student']:.3f}"
        )

    labels = emotion_labels(cfg)
    encoder = metrics.TokenEncoder(ev.encoder)
    ref_vectors = encoder.embed([ex.reference for ex in examples if ex.reference])
    # the teacher's held-out replies, as a second reference (the dialogues the cache holds)
    teacher_replies = {}
    if held_out is not None:
        teacher_replies = {r["example_id"]: r["teacher_response"] for r in held_out}
    with_teacher = [i for i, ex in enumerate(examples) if ex.example_id in teacher_replies]
    teacher_vectors = encoder.embed([teacher_replies[examples[i].example_id] for i in with_teacher])
    results = {}
    for name in folders:
        run = runs[name]
        results[name] = {
            "folder": str(folders[name]),
            **score(examples, run, encoder, ref_vectors, cfg.teacher_cache.quality, labels),
            "judge_vs_baseline": judge.win_rates(verdicts[name]) if name in verdicts else None,
            "teacher_fidelity": teacher_fidelity(run, encoder, with_teacher, teacher_vectors),
            "parameters": run["parameters"],
            "weights_mib": run["weights_mib"],
            "generated_tokens": run["generated_tokens"],
            "tokens_per_second": round(run["generated_tokens"] / run["generation_seconds"], 1)
            if run["generation_seconds"]
            else None,
            "peak_engine_rss_mib": run["peak_engine_rss_mib"],
            "engine_startup_seconds": run["engine_startup_seconds"],
            "engine_reused": run["engine_reused"],
        }
    summary_metrics = {
        "input": [str(p) for p in ev.inputs],
        "examples_read": n_read,
        "rejected": len(rejects),
        "other_split": other_split,
        "examples": len(examples),
        "baseline": baseline,
        "judge": str(judge_dir),
        "encoder": str(encoder.folder),
        "bertscore": "MiniLM last layer, greedy token matching, no idf, no rescaling",
        "bleu": "sentence BLEU-4, BLEU+1 smoothing, mean over examples with a reference",
        "max_new_tokens": ev.max_new_tokens,
        "emotion_labels": labels,
        "teacher_cache": str(ev.teacher_cache) if ev.teacher_cache else None,
        "models": results,
        "judge_check": check,
        "judge_check_note": check_note,
        "judge_seconds": round(judge_seconds, 1),
    }
    atomic_write_text(out / "metrics.json", json.dumps(summary_metrics, indent=2) + "\n")
    write_replies(out / "replies.jsonl", examples, runs, verdicts)
    atomic_write_text(
        out / "rejects.jsonl",
        "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rejects),
    )
    charts = report.write_report(out, summary_metrics, examples, runs, ev.report_examples)

    summary: dict[str, Any] = {
        "examples_read": n_read,
        "rejected": len(rejects),
        "other_split": other_split,
        "evaluated": len(examples),
    }
    for name, r in results.items():
        win = r["judge_vs_baseline"]
        verdict = (
            f", vs {baseline}: win {win['win_rate']:.2f} tie {win['tie_rate']:.2f} "
            f"loss {win['loss_rate']:.2f} (debiased win {win['debiased_win_rate']:.2f})"
            if win and win["pairs"]
            else ""
        )
        summary[name] = (
            f"BERTScore-F1 {report.fmt(r['bertscore_f1'])}, emotion acc "
            f"{report.fmt(r['emotion_accuracy'])}{verdict}"
        )
    summary["judge_check"] = (
        f"agreement {check['agreement']:.2f} (debiased {check['debiased_agreement']:.2f}) "
        f"on {check['pairs']} pairs"
        if check and check["pairs"]
        else check_note or "no pair could be judged"
    )
    summary["charts"] = ", ".join(p.name for p in charts)
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    summary["output"] = str(out)
    return summary


def write_replies(path: Path, examples, runs, verdicts) -> None:
    """One line per example: the dialogue, the reference, and every model's reply and emotion."""
    lines = []
    for i, ex in enumerate(examples):
        row = {
            "example_id": ex.example_id,
            "dialogue": ex.dialogue,
            "reference": ex.reference,
            "emotion": ex.emotion,
            "models": {
                name: {
                    "reply": run["replies"][i],
                    "emotion": run["emotions"][i],
                    **({"judge": verdicts[name][i]} if name in verdicts else {}),
                }
                for name, run in runs.items()
            },
        }
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines))
