"""`pipeline inspect DIR`: what a teacher cache holds, computed lazily with polars.

    pipeline inspect runs/demo/teacher_cache

Only the small columns are scanned (never the top-k lists), so it stays quick on a large cache.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from shared.errors import PipelineError
from shared.schema import read_rejects, verify_cache


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
