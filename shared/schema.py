"""The hand-off between the stages: the Parquet shard schema, the top-k encoding and the manifest.

A cache folder holds `shard-<hash>.parquet` files (`shard_name`), `manifest.json` (written only by
the driver of `teacher-cache`, atomically after each shard, so it always describes exactly the
finished shards), `rejects.jsonl` and `resolved_config.yaml`. Shards are written under a temporary
name of their writer's (`temp_path`) and renamed when complete.

Top-k encoding: for reply token t, `topk_token_ids[t]` holds the teacher's k most likely next-token
ids (descending) and `topk_logprobs[t]` their raw log-probabilities (temperature 1, log-softmax over
the full vocabulary), conditioned on `teacher_context_token_ids + response_token_ids[:t]`;
`target_logprob[t]` is the log-probability of `response_token_ids[t]` itself.
In the improvement mode the columns are the same, the reply being the teacher's rewrite of
`base_response`; the pair (chosen = `teacher_response`, rejected = `base_response`) is what
preference training reads.
`teacher_features` is the teacher's last hidden state (final norm applied) at each position that
predicts a reply token (the same positions as the top-k: the last context position, then the reply
tokens but the last), L2-normalised per token, then averaged over the reply.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shared.errors import PipelineError

# 2: improvement_strategy + base_response; 3: features at predicting positions;
# 4: the quality gate's teacher_attempt + quality_flags, and the `sampling` setting
SCHEMA_VERSION = 4
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
REJECTS_PARTS = "rejects-*.jsonl"  # each writer's own (`rejects_part`), merged into REJECTS


def rejects_part(writer: str) -> str:
    return f"rejects-{writer}.jsonl"


SHARD_GLOB = "shard-*.parquet"
# What a manifest may list: `shard-<16 hex digits>.parquet`, named after the example ids it was
# asked to hold (`shard_name`), so no two writers can choose the same name and a retried unit
# rewrites its own shard in place; `shard-<5 digits>` is the name older single-writer runs used.
SHARD_NAME = re.compile(r"shard-(\d{5}|[0-9a-f]{16})\.parquet")


def shard_name(example_ids: list[str]) -> str:
    """The shard name of a unit of work: a hash of the example ids it was given (sorted)."""
    digest = hashlib.sha256("\n".join(sorted(example_ids)).encode()).hexdigest()
    return f"shard-{digest[:16]}.parquet"


def temp_path(path: Path, writer: str) -> Path:
    """Where `writer` writes `path` before the rename: one name per writer, so a writer can
    delete its own leftovers without touching another writer's file in flight."""
    return path.with_name(f".{path.name}.{writer}.tmp")


_turn = pa.struct([("role", pa.string()), ("text", pa.string())])
_media = pa.struct(
    [("type", pa.string()), ("path", pa.string()), ("start", pa.float64()), ("end", pa.float64())]
)
_candidate = pa.struct([("name", pa.string()), ("text", pa.string()), ("rating", pa.float64())])

SHARD_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("dialogue", pa.list_(_turn)),
        ("privileged", pa.map_(pa.string(), pa.string())),
        ("media", pa.list_(_media)),
        ("emotion", pa.string()),
        ("reference", pa.string()),
        ("candidates", pa.list_(_candidate)),  # other rated replies (for preference pairs)
        ("teacher_reasoning", pa.string()),
        ("teacher_emotion", pa.string()),
        ("teacher_response", pa.string()),
        ("teacher_parse_ok", pa.bool_()),  # False: the teacher ignored the format (fallback reply)
        ("teacher_finish_reason", pa.string()),  # "stop" or "length" (hit max_new_tokens)
        ("teacher_context_token_ids", pa.list_(pa.int32())),  # all the teacher saw before the reply
        ("response_token_ids", pa.list_(pa.int32())),
        ("topk_token_ids", pa.list_(pa.list_(pa.int32()))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("target_logprob", pa.list_(pa.float32())),
        ("teacher_features", pa.list_(pa.float32())),
        # Targeted empathy improvement (Xie et al.): the teacher rewrote `base_response` with this
        # strategy; teacher_response is the improved reply. A preference pair is
        # (chosen = teacher_response, rejected = base_response). Both null in the answer mode.
        ("improvement_strategy", pa.string()),
        ("base_response", pa.string()),
        # The quality gate (stage1_teacher/quality.py): which attempt's reply this is (0 = the
        # first; a retry is a seeded sample), and the checks it failed under a `flag` policy.
        ("teacher_attempt", pa.int32()),
        ("quality_flags", pa.list_(pa.string())),
    ]
)

DICTIONARY_COLUMNS = ["source", "split", "emotion", "teacher_emotion", "teacher_finish_reason"]
FLOAT_COLUMNS = ["topk_logprobs", "target_logprob", "teacher_features"]

# Settings that must agree between every shard of one cache folder (and with the consumer).
SETTING_KEYS = (
    "schema_version",
    "teacher_weights_sha256",
    "tokenizer_fingerprint",
    "vocab_size",
    "top_k",
    "logprob_mode",
    "temperature",
    "top_p",
    "max_new_tokens",
    "sampling",  # teacher.sampling: penalties etc. passed to vLLM (the logprobs stay raw)
    "reply_sampling",  # teacher.reply_sampling: the same for the reply turns only
    "prompt_template_sha256",
    "feature_dim",
    "media",  # frames / image size a vision-language teacher saw (None for a text teacher)
)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_shard(
    rows: list[dict[str, Any]],
    path: Path,
    row_group_size: int,
    metadata: dict[str, str] | None = None,
    writer: str = "local",
) -> dict[str, Any]:
    """Write rows as one shard under a temporary name, then rename; return its manifest entry.

    `metadata` goes into the Parquet footer, so a shard renamed just before a kill (and so not yet
    in the manifest) can still be checked and adopted by the next run."""
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA.with_metadata(metadata or {}))
    tmp = temp_path(path, writer)
    pq.write_table(
        table,
        tmp,
        row_group_size=row_group_size,
        compression="zstd",
        # Dictionary encoding only where values repeat; float columns are byte-stream-split
        # instead, which lets zstd find the shared exponent bytes (-26% bytes on the demo cache).
        use_dictionary=DICTIONARY_COLUMNS,
        use_byte_stream_split=FLOAT_COLUMNS,
    )
    os.replace(tmp, path)
    return {
        "file": path.name,
        "rows": table.num_rows,
        "reply_tokens": int(sum(len(r["response_token_ids"]) for r in rows)),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise PipelineError(
            f"{path} is unreadable ({e}); delete the folder to start over"
        ) from None
    problem = manifest_problem(manifest)
    if problem:
        raise PipelineError(
            f"{path} is not a teacher-cache manifest ({problem}); point at a cache folder, or "
            "delete the folder to rebuild it"
        )
    return manifest


def manifest_problem(manifest: Any) -> str | None:
    """What is structurally wrong with a parsed manifest, for every reader (teacher-cache on
    rerun, inspect, distill), or None."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("settings"), dict):
        return "no settings object"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "no shards list"
    seen = set()
    for n, entry in enumerate(shards, 1):
        if not isinstance(entry, dict):
            return f"shard entry {n} is not an object"
        name = entry.get("file")
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            return f"shard entry {n}: file {name!r} is not a shard name"
        if name in seen:
            return f"{name} is listed twice"
        seen.add(name)
        for key in ("rows", "reply_tokens", "bytes"):
            value = entry.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return f"{name}: {key} {value!r} is not a count"
        if not isinstance(entry.get("sha256"), str):
            return f"{name}: no sha256"
    return None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))


def settings_mismatch(have: dict[str, Any], want: dict[str, Any], keys=SETTING_KEYS) -> list[str]:
    """Human-readable differences between two settings dicts, over `keys`."""
    return [f"{k} {have.get(k)!r} != {want.get(k)!r}" for k in keys if have.get(k) != want.get(k)]


def verify_cache(
    folder: Path,
    *,
    tokenizer_fingerprint: str | None = None,
    vocab_size: int | None = None,
    top_k: int | None = None,
    check_checksums: bool = True,
) -> dict[str, Any]:
    """The consumer's check: refuse a cache that does not fit, naming the shard and what to do."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise PipelineError(
            f"{folder} has no {MANIFEST}: not a teacher cache (run `pipeline teacher-cache` first)"
        )
    s = manifest.get("settings", {})
    if s.get("schema_version") != SCHEMA_VERSION:
        raise PipelineError(
            f"{folder}: shard schema version {s.get('schema_version')} but this code reads "
            f"{SCHEMA_VERSION}; rebuild the cache with this version of `pipeline teacher-cache`"
        )
    if (
        tokenizer_fingerprint is not None
        and s.get("tokenizer_fingerprint") != tokenizer_fingerprint
    ):
        raise PipelineError(
            f"{folder}: the teacher's tokenizer ({s.get('tokenizer_fingerprint')}) differs from "
            f"the student's ({tokenizer_fingerprint}); logit-level losses need the same tokenizer"
        )
    if vocab_size is not None and s.get("vocab_size") != vocab_size:
        raise PipelineError(
            f"{folder}: cache vocabulary {s.get('vocab_size')} != student vocabulary "
            f"{vocab_size}; use a student with the teacher's tokenizer, or rebuild the cache "
            "with a teacher that shares the student's"
        )
    if top_k is not None and s.get("top_k") != top_k:
        raise PipelineError(
            f"{folder}: cache has top-k {s.get('top_k')} but {top_k} was asked for; "
            "set the same k or rebuild the cache"
        )
    for entry in manifest.get("shards", []):
        path = folder / entry["file"]
        if not path.exists():
            raise PipelineError(f"{path}: listed in the manifest but missing; rerun teacher-cache")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            raise PipelineError(f"{path}: unreadable shard ({e}); delete it and rerun") from None
        if rows != entry["rows"]:
            raise PipelineError(
                f"{path}: {rows} rows but the manifest says {entry['rows']} (replaced or damaged); "
                "delete it and rerun teacher-cache to redo its examples"
            )
        if check_checksums and file_sha256(path) != entry["sha256"]:
            raise PipelineError(
                f"{path}: checksum differs from the manifest (changed or corrupt); "
                "delete it and rerun teacher-cache to rebuild it"
            )
    return manifest


def topk_arrays(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Decode one row's top-k columns into dense [T, K] arrays (ids int64, logprobs float32)."""
    k = len(row["topk_token_ids"][0]) if row["topk_token_ids"] else 0
    ids = np.asarray(row["topk_token_ids"], dtype=np.int64).reshape(-1, k)
    lps = np.asarray(row["topk_logprobs"], dtype=np.float32).reshape(-1, k)
    return ids, lps


def read_rejects(out: Path) -> list[dict]:
    """The folder's rejects.jsonl, checked line by line (read before any teacher work, so a
    damaged file stops the run before the engine starts, not after)."""
    records, required = [], ("origin", "reason")
    # and the writers' own files that a killed run did not merge yet (`REJECTS_PARTS`)
    paths = [Path(out) / REJECTS, *sorted(Path(out).glob(REJECTS_PARTS))]
    for path in paths:
        if not path.exists():
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PipelineError(f"{path}: unreadable ({e}); delete it to count anew") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except (ValueError, RecursionError):
                r = None
            if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in required):
                if path.name != REJECTS and n == len(lines):
                    continue  # a writer killed mid-line: that unit is redone anyway
                raise PipelineError(
                    f"{path}: line {n} is not a reject record; fix or delete that line and rerun"
                )
            records.append(r)
    return records
