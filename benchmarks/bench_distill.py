"""Benchmark stage two on the embedded default: `pride` against `sft`, and the shard stream's speed.

    python benchmarks/bench_distill.py --shards runs/demo/teacher_cache [--steps 8] [--zero 2]

In one run, with the same batch and ZeRO config: the median optimizer-step time of `pride` and
`sft` (goal: ratio <= 1.25), the peak resident memory of each (each method trains in its own
child process, so one's peak does not hide the other's), and the rows per second the shard stream
delivers (read + shuffle, and with tokenisation and collation) against the rows per second
training consumes (goal: >= 10x). Prints a markdown table.

`sft` trains on the dataset's references, `pride` on the teacher's replies: the sequences differ.
`seqkd` (CE on the teacher's replies, plain student) is timed too, as the same-data control: the
pride / seqkd ratio is the cost of multi-source attention + reverse KL + MMD alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(args: argparse.Namespace) -> None:
    """Train one method for warmup + steps and print its step times and peak RSS as JSON."""
    from empathy_distill.shared.config import load_config
    from empathy_distill.stage2_distill.distill import main

    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"distill.shards={json.dumps(str(Path(args.shards).resolve()))}",
            f"distill.output={json.dumps(out)}",
            f"distill.method={args.child}",
            f"distill.max_steps={args.warmup + args.steps}",
            f"distill.deepspeed={json.dumps(str(REPO / 'configs' / f'zero{args.zero}.json'))}",
            f"distill.micro_batch_size={args.batch}",
            "distill.checkpoint_every=1000000",
        ]
        main(load_config(args.config, args.pipeline, overrides))
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        seconds = [json.loads(line)["seconds"] for line in lines][args.warmup :]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("BENCH " + json.dumps({"seconds": seconds, "peak_mib": peak_mib}))


def stream_rates(args: argparse.Namespace) -> tuple[float, float]:
    """Rows/s of the bare stream and of stream + encode + collate, over two passes."""
    from empathy_distill.shared.config import load_config
    from empathy_distill.shared.models import load_tokenizer
    from empathy_distill.shared.schema import read_manifest
    from empathy_distill.stage2_distill.batch import collate, encode_row
    from empathy_distill.stage2_distill.stream import ShardStream

    cfg = load_config(args.config, args.pipeline)
    folder = Path(args.shards)
    manifest = read_manifest(folder)
    rows = 2 * manifest["rows"]
    t0 = time.perf_counter()
    for _ in itertools.islice(ShardStream(folder, manifest["shards"]), rows):
        pass
    bare = rows / (time.perf_counter() - t0)

    tokenizer = load_tokenizer(cfg.student.model)
    sources = cfg.distill.privileged_sources
    stream = ShardStream(folder, manifest["shards"])
    t0 = time.perf_counter()
    for _ in range(rows // args.batch):
        batch = [
            encode_row(
                next(stream),
                tokenizer,
                target="teacher",
                sources=sources,
                max_len=cfg.distill.max_seq_len,
                privileged_max_tokens=cfg.distill.privileged_max_tokens,
            )
            for _ in range(args.batch)
        ]
        collate(batch, tokenizer.pad_token_id, manifest["settings"]["top_k"], sources)
    full = (rows // args.batch) * args.batch / (time.perf_counter() - t0)
    return bare, full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "pipelines.yaml"))
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--shards", default=str(REPO / "runs" / "demo" / "teacher_cache"))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch size")
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    results = {}
    for method in ("pride", "sft", "seqkd"):
        cmd = [sys.executable, __file__, "--child", method]
        cmd += ["--config", args.config, "--pipeline", args.pipeline, "--shards", args.shards]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--batch", str(args.batch), "--zero", str(args.zero)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        report = [ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")]
        if done.returncode or not report:
            sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
        results[method] = json.loads(report[-1][len("BENCH ") :])
    bare, full = stream_rates(args)

    step = {m: statistics.median(r["seconds"]) for m, r in results.items()}
    # The fastest step is the least disturbed by other jobs on a shared machine.
    fastest = {m: min(r["seconds"]) for m, r in results.items()}
    consumed = args.batch / step["pride"]
    print(f"\nbatch {args.batch} x 1 rank, ZeRO-{args.zero}, {args.steps} timed steps per method\n")
    print("| figure | value | goal |")
    print("|---|---|---|")
    print(f"| step time pride (median) | {step['pride']:.3f} s | |")
    print(f"| step time sft (median) | {step['sft']:.3f} s | |")
    print(f"| step time seqkd (median, same rows as pride) | {step['seqkd']:.3f} s | |")
    for other in ("sft", "seqkd"):
        med, low = step["pride"] / step[other], fastest["pride"] / fastest[other]
        print(f"| pride / {other} step time (median; fastest) | {med:.2f}; {low:.2f} | <= 1.25 |")
    print(f"| peak RSS pride | {results['pride']['peak_mib']:.0f} MiB | |")
    print(f"| peak RSS sft | {results['sft']['peak_mib']:.0f} MiB | |")
    print(f"| peak RSS seqkd | {results['seqkd']['peak_mib']:.0f} MiB | |")
    print(f"| rows/s consumed by pride training | {consumed:.1f} | |")
    for name, rate in (("shard stream (read + shuffle)", bare), ("+ tokenise + collate", full)):
        print(f"| rows/s {name} | {rate:.0f} ({rate / consumed:.0f}x training) | >= 10x |")


if __name__ == "__main__":
    main()
