"""`pipeline inspect DIR`: what a teacher cache holds, computed lazily with polars; with
`--rescore N`, whether it still matches the live teacher.

    pipeline inspect runs/demo/teacher_cache
    pipeline inspect runs/demo/teacher_cache --rescore 20

Only the small columns are scanned (never the top-k lists), so it stays quick on a large cache.
`--rescore N` runs the teacher folder the manifest names in transformers (float32, on the CPU
or the first GPU) over N random rows' stored context and reply, and compares what the cache
says with what the teacher says now (`rescore`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.schema import bucket_kl, read_rejects, read_rows, verify_cache


def _table(df: pl.DataFrame, title: str) -> str:
    lines = [f"\n{title}"]
    if df.height == 0:
        return lines[0] + "\n  (none)"
    cols = df.columns
    width = [max(len(c), *(len(str(v)) for v in df[c])) for c in cols]
    lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(cols, width, strict=True)))
    for row in df.iter_rows():
        lines.append("  " + "  ".join(str(v).ljust(w) for v, w in zip(row, width, strict=True)))
    return "\n".join(lines)


def main(folder: Path) -> str:
    """The report of what the cache holds (a damaged cache is one PipelineError)."""
    folder = Path(folder)
    # distill's own check (schema, every listed shard present, readable, its row count and
    # checksum): a cache reported here as fine is one distill will take.
    manifest = verify_cache(folder)
    rejects = read_rejects(folder)
    try:
        return report(folder, manifest, rejects)
    except pl.exceptions.PolarsError as e:
        raise PipelineError(
            f"{folder}: the shards do not read as one table ({str(e).splitlines()[0]}); "
            "rebuild the cache"
        ) from None


def report(folder: Path, manifest: dict, rejects: list[dict]) -> str:
    files = [str(folder / e["file"]) for e in manifest["shards"]]
    s = manifest["settings"]
    out = [
        f"cache {folder}",
        f"  teacher {manifest.get('teacher_model')} (weights {s['teacher_weights_sha256'][:12]}), "
        f"k={s['top_k']}, {len(files)} shards, {manifest.get('rows', 0)} rows, "
        f"{sum(e['bytes'] for e in manifest['shards']) / 1e6:.1f} MB",
    ]
    if files:
        lf = pl.scan_parquet(files).select(
            "source",
            "split",
            "emotion",
            "teacher_emotion",
            "teacher_parse_ok",
            "teacher_finish_reason",
            "teacher_attempt",
            "quality_flags",
            pl.col("response_token_ids").list.len().alias("reply_tokens"),
        )
        by_source = (
            lf.group_by("source", "split")
            .agg(
                pl.len().alias("examples"),
                pl.col("reply_tokens").sum().alias("reply_tokens"),
                pl.col("reply_tokens").mean().round(1).alias("mean_reply"),
                pl.col("teacher_parse_ok").mean().round(3).alias("parsed"),
                (pl.col("teacher_finish_reason") == "length").sum().alias("truncated"),
            )
            .sort("source", "split")
            .collect()
        )
        out.append(_table(by_source, "examples by source"))
        gate = lf.select(
            (pl.col("teacher_attempt") == 0).sum().alias("accepted_first_try"),
            (pl.col("teacher_attempt") > 0).sum().alias("accepted_after_retry"),
            (pl.col("quality_flags").list.len() > 0).sum().alias("flagged"),
            (pl.col("reply_tokens") == 0).sum().alias("empty_rows"),
        ).collect()
        out.append(_table(gate, "quality gate (rows in the shards; its rejects are below)"))
        agree = (
            lf.filter(pl.col("emotion").is_not_null())
            .group_by("emotion")
            .agg(
                pl.len().alias("examples"),
                (pl.col("teacher_emotion") == pl.col("emotion"))
                .mean()
                .round(3)
                .alias("teacher_agrees"),
                pl.col("teacher_emotion").mode().first().alias("teacher_says_most"),
            )
            .sort("examples", "emotion", descending=[True, False])
            .collect()
        )
        out.append(_table(agree, "by gold emotion (teacher emotion agreement)"))
        overall = (
            lf.filter(pl.col("emotion").is_not_null())
            .select((pl.col("teacher_emotion") == pl.col("emotion")).mean())
            .collect()
            .item()
        )
        if overall is not None:
            out.append(f"\n  teacher emotion agreement overall: {overall:.3f}")
    # Reasons like "dialogue too long: 2100 prompt tokens ..." group by their first clause.
    reasons = pl.DataFrame(
        {"reason": [r["reason"].split(":")[0] for r in rejects]}, schema={"reason": pl.String}
    )
    out.append(
        _table(
            reasons.group_by("reason").len("rejects").sort("rejects", descending=True),
            "rejects by reason",
        )
    )
    return "\n".join(out)


# ----------------------------------------------------------------------------- rescore


@dataclass
class Tolerance:
    """How far the cache may be from the live teacher. The defaults suit a float32 teacher
    (vLLM and transformers then agree to ~1e-4, and the top-k encoding adds a bucket KL of
    ~2e-4); a bf16 teacher differs from its float32 self by up to ~0.3 nats (README, GPU
    machines): pass e.g. 0.5 / 0.02 / 0.995."""

    logprob: float = 0.01  # |top-1| and |target| log-probability, and the top-k ids' order
    kl: float = 2e-3  # mean (K+1)-bucket KL(live || cached) per reply token
    cosine: float = 0.999  # smallest cosine between cached and live features


def rescore(folder: Path, n: int, tol: Tolerance, seed: int = 0) -> tuple[str, bool]:
    """Re-score `n` random rows with the teacher the manifest names; (report, within tolerance).

    Per row: the live teacher's log-softmax at the positions that predicted the stored reply
    tokens. Compared: the top-1 and target log-probabilities (stored as they are), that the
    stored ids are the live top-k (up to ties within the tolerance), the (K+1)-bucket KL between
    the live distribution at the stored ids and the stored one, and the cosine of the features.
    A vision-language teacher gets each row's frames again, with the media settings the manifest
    recorded."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from empathy_distill.shared.models import is_multimodal, load_processor, model_sha256
    from empathy_distill.stage1_teacher.media import MediaError, load_media

    folder = Path(folder)
    manifest = verify_cache(folder)
    teacher = Path(manifest.get("teacher_model") or "")
    if not (teacher / "config.json").is_file():
        raise PipelineError(
            f"rescore needs the teacher the manifest names, {teacher}, and it is not a model "
            "folder here; run it where the teacher is"
        )
    ids = [
        (entry["file"], i)
        for entry in manifest["shards"]
        for i in range(pq.ParquetFile(folder / entry["file"]).metadata.num_rows)
    ]
    rng = np.random.default_rng(seed)
    picked = sorted(ids[j] for j in rng.choice(len(ids), min(n, len(ids)), replace=False))
    lines = [f"rescore {len(picked)} of {len(ids)} rows against {teacher}"]
    same = model_sha256(teacher) == manifest["settings"]["teacher_weights_sha256"]
    lines.append(f"  teacher weights as when cached: {'yes' if same else 'NO (changed since)'}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vlm = is_multimodal(teacher)
    if vlm:
        from transformers import AutoModelForImageTextToText as Auto

        processor = load_processor(teacher)
    else:
        from transformers import AutoModelForCausalLM as Auto
    model = Auto.from_pretrained(teacher, dtype=torch.float32).to(device).eval()
    media = manifest["settings"].get("media") or {}

    top1, target, order, kls, cosines, skipped = [], [], [], [], [], []
    rows = {}
    for file in sorted({f for f, _ in picked}):
        rows[file] = read_rows(folder / file)
    for file, i in picked:
        r = rows[file][i]
        ctx, reply = list(r["teacher_context_token_ids"]), list(r["response_token_ids"])
        if not reply:
            continue
        extra = {}
        if r["media"]:
            if not vlm:
                skipped.append(f"{r['example_id']}: media rows need a vision-language teacher")
                continue
            try:
                frames = load_media(r["media"], media.get("frames", 8), media.get("image_size"))
            except MediaError as e:
                skipped.append(f"{r['example_id']}: {e}")
                continue
            extra = dict(processor.image_processor(frames, return_tensors="pt"))
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor([ctx + reply], device=device),
                output_hidden_states=True,
                **{k: v.to(device) for k, v in extra.items()},
            )
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
        live = logp[len(ctx) - 1 : len(ctx) - 1 + len(reply)].cpu()
        stored_ids = torch.from_numpy(r["topk_token_ids"]).long()
        at_ids = live.gather(1, stored_ids)
        k = stored_ids.shape[1]
        top1 += (at_ids[:, 0] - torch.from_numpy(r["topk_logprobs"][:, 0])).abs().tolist()
        got = live.gather(1, torch.tensor(reply)[:, None])[:, 0]
        target += (got - torch.tensor(r["target_logprob"])).abs().tolist()
        best = live.topk(k, dim=-1).values
        order += (best - at_ids).abs().amax(dim=-1).tolist()
        kls += bucket_kl(at_ids.numpy(), r["topk_logprobs"]).tolist()
        if len(r["teacher_features"]):
            states = torch.nn.functional.normalize(out.hidden_states[-1][0].float(), dim=-1)
            mean = states[len(ctx) - 1 : len(ctx) - 1 + len(reply)].mean(0).cpu()
            cached = torch.from_numpy(r["teacher_features"])
            cosines.append(torch.nn.functional.cosine_similarity(mean, cached, dim=0).item())

    checks = [
        ("top-1 log-prob |diff| max", max(top1, default=0.0), tol.logprob, "<="),
        ("target log-prob |diff| max", max(target, default=0.0), tol.logprob, "<="),
        ("stored ids are the live top-k (|diff| max)", max(order, default=0.0), tol.logprob, "<="),
        ("top-k bucket KL, mean per token", float(np.mean(kls)) if kls else 0.0, tol.kl, "<="),
        ("feature cosine min", min(cosines, default=1.0), tol.cosine, ">="),
    ]
    ok = same and bool(top1)
    lines.append(f"  reply tokens compared: {len(top1)}; features: {len(cosines)} rows")
    for name, value, limit, how in checks:
        good = value <= limit if how == "<=" else value >= limit
        ok &= good
        lines.append(f"  {'ok  ' if good else 'FAIL'} {name}: {value:.3g} ({how} {limit:g})")
    if kls:
        lines.append(f"       (bucket KL max over tokens: {max(kls):.3g})")
    for note in skipped:
        lines.append(f"  skipped {note}")
    lines.append("within tolerance" if ok else "NOT within tolerance: the cache does not match")
    return "\n".join(lines), ok
