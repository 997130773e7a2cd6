"""Benchmark the cache's size and cost at several k, in one script run.

    .venv/bin/python benchmarks/bench_cache.py                      # k = 20, 64, 128; 64 demo rows
    .venv/bin/python benchmarks/bench_cache.py --ks 20 64 --limit 32 --rescore 8

For each k, `teacher-cache` on the first `--limit` demo examples into a fresh folder, each in a
child process (its wall time, and the peak resident memory of it and its engine process). Then,
from the Parquet footers: the bytes per reply token and per top-k entry of each stored column;
the same exact rows written in schema 4's layout as they were made (int32 ids, float32
log-probabilities and features, zstd, as that writer laid them out) for the before/after; the
rows per second the shard stream delivers, top-k decoding included; and `pipeline inspect
--rescore` on a few rows (the bucket KL of the stored top-k against the live teacher in
transformers).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Bytes per top-k entry published by others, for the side-by-side (README: Measured).
PUBLISHED = {
    "DistillKit (k = 128, ~330 B per token)": 2.6,
    "Megatron offline KD (before zstd)": 4.1,
}


def child(args: argparse.Namespace) -> None:
    """One `teacher-cache` run (local backend); its summary and peak memory (self and reaped
    children: the engine process) as the last line. Every shard's exact rows also go, in
    schema 4's layout, to `<output>-schema4/`: the before of the before/after."""
    from empathy_distill.shared.config import load_config
    from empathy_distill.stage1_teacher import teacher_cache, workers

    cfg = load_config(args.config, args.pipeline, args.overrides)
    before = Path(f"{cfg.teacher_cache.output}-schema4")
    before.mkdir(parents=True)
    write_shard = workers.write_shard

    def both(rows, path, *a, **kw):
        write_schema4(rows, before / path.name)
        return write_shard(rows, path, *a, **kw)

    workers.write_shard = both
    summary = teacher_cache.main(cfg)
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    print(json.dumps({**summary, "peak_mib": round(peak / 1024)}))


def column_bytes(folder: Path) -> dict[str, int]:
    """Compressed bytes of each stored column, summed over every shard and row group."""
    import pyarrow.parquet as pq

    sizes: dict[str, int] = {}
    for path in sorted(folder.glob("shard-*.parquet")):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + col.total_compressed_size
    return sizes


def write_schema4(rows: list[dict], path: Path) -> None:
    """The big columns as schema 4 stored them: ids int32, log-probabilities and features
    float32, zstd at pyarrow's default level, dictionaries off; its writer named nested columns for
    byte-stream-split, which Parquet ignored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "example_id": pa.array([r["example_id"] for r in rows], pa.string()),
            "topk_token_ids": pa.array(
                [r["topk_token_ids"] for r in rows], pa.list_(pa.list_(pa.int32()))
            ),
            "topk_logprobs": pa.array(
                [r["topk_logprobs"] for r in rows], pa.list_(pa.list_(pa.float32()))
            ),
            "teacher_features": pa.array(
                [r["teacher_features"] for r in rows], pa.list_(pa.float32())
            ),
        }
    )
    pq.write_table(table, path, compression="zstd", row_group_size=16, use_dictionary=False)


def train_child(args: argparse.Namespace) -> None:
    """`pride` for `--train-steps` steps on the cache `--train`; with `--exact`, the stream hands
    out the exact top-k and features (from the schema-4 copy) instead of the decoded ones. Prints
    the per-step records and the peak memory as the last line."""
    import tempfile

    from empathy_distill.shared.config import load_config
    from empathy_distill.stage2_distill import stream

    if args.exact:
        import pyarrow.parquet as pq

        exact = {
            r["example_id"]: r
            for path in sorted(Path(args.exact).glob("shard-*.parquet"))
            for r in pq.read_table(path).to_pylist()
        }
        decode = stream.decode_table

        def exact_rows(table):
            rows = decode(table)
            for r in rows:
                e = exact[r["example_id"]]
                r["topk_logprobs"] = np.asarray(e["topk_logprobs"], np.float32).reshape(
                    r["topk_logprobs"].shape
                )
                r["teacher_features"] = np.asarray(e["teacher_features"], np.float32)
            return rows

        stream.decode_table = exact_rows
    from empathy_distill.stage2_distill.distill import main as distill

    with tempfile.TemporaryDirectory() as out:
        sets = [
            f"distill.shards={json.dumps(args.train)}",
            f"distill.output={json.dumps(out)}",
            "distill.method=pride",
            f"distill.max_steps={args.train_steps}",
            "distill.checkpoint_every=1000000",
        ]
        distill(load_config(args.config, args.pipeline, sets))
        records = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"records": records, "peak_mib": round(peak)}))


def run_child(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--config", args.config, "--pipeline", args.pipeline, *extra]
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def stream_rate(folder: Path, rows: int) -> float:
    from empathy_distill.shared.schema import read_manifest
    from empathy_distill.stage2_distill.stream import ShardStream

    manifest = read_manifest(folder)
    stream = ShardStream(folder, manifest["shards"], buffer_size=64)
    t0 = time.perf_counter()
    for _ in range(rows):
        next(stream)
    return rows / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "pipelines.yaml"))
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[20, 64, 128])
    parser.add_argument("--rescore", type=int, default=8, help="rows to re-score per k (0: none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--train-steps", type=int, default=30, help="pride steps per k (0: no training)"
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--exact", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return child(args)
    if args.train:
        return train_child(args)

    from empathy_distill.stage1_teacher.inspect_cache import Tolerance, rescore

    results, curves = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            out = Path(tmp) / f"k{k}"
            sets = [
                *args.overrides,
                f"teacher_cache.top_k={k}",
                f"teacher_cache.limit={args.limit}",
                f"teacher_cache.output={out}",
            ]
            s = run_child(args, "--one", *(x for s in sets for x in ("--set", s)))
            tokens = s["reply_tokens"]
            now, before = column_bytes(out), column_bytes(Path(f"{out}-schema4"))
            topk_now = sum(now[c] for c in ("topk_token_ids", "topk_top1_logprob", "topk_logrest"))
            topk_now += now["topk_gap_steps"]
            features_now = now["teacher_features_q8"] + now["teacher_features_scale"]
            topk_before = before["topk_token_ids"] + before["topk_logprobs"]
            entries = tokens * k
            text, _ = rescore(out, args.rescore, Tolerance()) if args.rescore else ("", True)
            kl = next((ln for ln in text.splitlines() if "bucket KL, mean" in ln), "")
            results[k] = {
                "rows": s["rows"],
                "reply_tokens": tokens,
                "capture_wall_s": s["wall_seconds"],
                "capture_generate_s": s["generate_seconds"],
                "capture_peak_mib": s["peak_mib"],
                "bytes_per_reply_token": round(sum(now.values()) / tokens, 1),
                "topk_bytes_per_entry": round(topk_now / entries, 3),
                "of_which_ids": round(now["topk_token_ids"] / entries, 3),
                "of_which_gap_steps": round(now["topk_gap_steps"] / entries, 3),
                "of_which_top1_and_rest": round(
                    (now["topk_top1_logprob"] + now["topk_logrest"]) / entries, 3
                ),
                "schema4_topk_bytes_per_entry": round(topk_before / entries, 3),
                "features_bytes_per_token": round(features_now / tokens, 1),
                "schema4_features_bytes_per_token": round(before["teacher_features"] / tokens, 1),
                "stream_rows_per_s": round(stream_rate(out, 4 * s["rows"]), 1),
                "rescore_bucket_kl": kl.split(":")[-1].strip() if kl else None,
            }
            if args.train_steps:
                steps = ["--train", str(out), "--train-steps", str(args.train_steps)]
                t = run_child(args, *steps)
                seconds = sorted(r["seconds"] for r in t["records"][2:])
                results[k]["train_step_s_median"] = round(seconds[len(seconds) // 2], 2)
                results[k]["train_peak_mib"] = t["peak_mib"]
                results[k]["stream_vs_training"] = round(
                    results[k]["stream_rows_per_s"] * seconds[len(seconds) // 2] / 4
                )
                if k == args.ks[0]:  # the same run on the exact values: the loss curves
                    e = run_child(args, *steps, "--exact", f"{out}-schema4")
                    curves[k] = (t["records"], e["records"])
    base = results[args.ks[0]]["capture_wall_s"]
    for r in results.values():
        r["capture_ratio_to_first_k"] = round(r["capture_wall_s"] / base, 2)
    keys = list(next(iter(results.values())))
    print("\n| figure | " + " | ".join(f"k = {k}" for k in results) + " |")
    print("|---" * (len(results) + 1) + "|")
    for key in keys:
        print(f"| {key.replace('_', ' ')} | " + " | ".join(str(r[key]) for r in results.values()))
    for name, value in PUBLISHED.items():
        print(f"| published: {name} | {value} B per entry |")
    for k, (decoded, exact) in curves.items():
        print(f"\npride on the k = {k} cache, decoded vs exact top-k and features, per step:")
        print("| loss | max abs diff over steps | mean of the last 10, decoded | exact |")
        print("|---|---|---|---|")
        for key in ("ce", "rkl", "mmd", "loss"):
            a = [r[key] for r in decoded if key in r]
            b = [r[key] for r in exact if key in r]
            if a and b:
                diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
                print(f"| {key} | {diff:.4f} | {np.mean(a[-10:]):.4f} | {np.mean(b[-10:]):.4f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
