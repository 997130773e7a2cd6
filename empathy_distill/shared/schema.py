"""The hand-off between the stages: the Parquet shard schema, the top-k encoding and the manifest.

A cache folder holds `shard-<hash>.parquet` files (`shard_name`), `manifest.json` (written only by
the driver of `teacher-cache`, atomically after each shard, so it always describes exactly the
finished shards), `rejects.jsonl` and `resolved_config.yaml`. Shards are written under a temporary
name of their writer's (`temp_path`) and renamed when complete.

Rows have a logical form (what `write_shard` takes and `read_rows` / `decode_table` give back) and
a stored form (`SHARD_SCHEMA`); the encoding between them is written here once (`encode_topk`,
`decode_topk`) and named in every manifest and footer (`ENCODING`).

Top-k, logically: for reply token t, `topk_token_ids[t]` holds the teacher's k most likely
next-token ids (descending) and `topk_logprobs[t]` their raw log-probabilities (temperature 1,
log-softmax over the full vocabulary), conditioned on
`teacher_context_token_ids + response_token_ids[:t]`; `target_logprob[t]` is the log-probability
of `response_token_ids[t]` itself.

Top-k, stored (schema 5): the ids as they are (int32, byte-stream-split); per token the top-1
log-probability and the log of the mass of ranks 2..k, logsumexp(topk_logprobs[1:]), both
float32; and for ranks 2..k one byte each, the gap to the top-1 on a square-root scale:
code = round(sqrt(lp_1 - lp_i) / GAP_STEP), clipped to 255, stored as the step from the previous
rank's code (mod 256: small numbers, since the codes rise with the rank). Decoding sums the steps,
inverts the gaps and then
scales ranks 2..k together to their stored mass: the top-1 and the tail bucket (1 - top-k mass,
what the losses use beyond the k ids) come back exact to float32. Why a square root: an entry's
weight in a KL falls as exp(-gap), so its precision may coarsen as the gap grows. The steps are
0.0016 nats at the top and ~0.3 nats 16 nats down, and code 255 is 104 nats down, further than
any entry of a 49k vocabulary lies, so nothing clips in practice. Measured on a k = 64 demo
cache: mean per-token KL between the exact and the decoded (K+1)-bucket teacher distributions
2e-4 nats (the contract: at most 1e-3), 0.36 bytes per code after zstd.

In the improvement mode the columns are the same, the reply being the teacher's rewrite of
`base_response`; the pair (chosen = `teacher_response`, rejected = `base_response`) is what
preference training reads.
`teacher_features` is the teacher's last hidden state (final norm applied) at each position that
predicts a reply token (the same positions as the top-k: the last context position, then the reply
tokens but the last), L2-normalised per token, then averaged over the reply; stored as int8 with
a per-row scale (round(127 * f / max|f|)), whose cosine to the float32 vector is above 0.9999.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.files import atomic_write_text, file_sha256

# 2: improvement_strategy + base_response; 3: features at predicting positions;
# 4: the quality gate's teacher_attempt + quality_flags, and the `sampling` setting;
# 5: the compact top-k and float16 features (`ENCODING`), shard names from example ids
SCHEMA_VERSION = 5
GAP_STEP = 0.04  # the top-k gap codes' step on the square-root scale (see the module docstring)
ENCODING = {
    "topk_logprobs": "sqrt-gap-steps-u8",
    "gap_step": GAP_STEP,
    "teacher_features": "int8-row-scale",
}
ZSTD_LEVEL = 9  # beside 3, -10% on the gap steps at k = 64; 19 gains 3% more on the ids
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
        # the top-k, encoded (`encode_topk`): per reply token k ids, the top-1 log-probability,
        # the log of the mass of ranks 2..k, and k - 1 gap-code steps
        ("topk_token_ids", pa.list_(pa.list_(pa.int32()))),
        ("topk_top1_logprob", pa.list_(pa.float32())),
        ("topk_logrest", pa.list_(pa.float32())),
        ("topk_gap_steps", pa.list_(pa.list_(pa.uint8()))),
        ("target_logprob", pa.list_(pa.float32())),
        ("teacher_features_q8", pa.list_(pa.int8())),  # the features: int8 x scale / 127
        ("teacher_features_scale", pa.float32()),
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

# A row's logical columns (what writers give and readers get): the stored ones, with the top-k
# log-probabilities in place of their encoded columns.
LOGICAL_COLUMNS = [
    n
    for n in SHARD_SCHEMA.names
    if n not in ("topk_top1_logprob", "topk_logrest", "teacher_features_scale")
]
LOGICAL_COLUMNS[LOGICAL_COLUMNS.index("topk_gap_steps")] = "topk_logprobs"
LOGICAL_COLUMNS[LOGICAL_COLUMNS.index("teacher_features_q8")] = "teacher_features"
_ROW_DEFAULTS: dict[str, Any] = {
    "source": "",
    "split": "train",
    "privileged": [],
    "media": [],
    "emotion": None,
    "reference": None,
    "candidates": [],
    "teacher_reasoning": None,
    "teacher_emotion": None,
    "teacher_parse_ok": True,
    "teacher_finish_reason": "stop",
    "teacher_context_token_ids": [],
    "teacher_features": [],
    "improvement_strategy": None,
    "base_response": None,
    "teacher_attempt": 0,
    "quality_flags": [],
}


def new_row(**fields: Any) -> dict[str, Any]:
    """A logical row: `fields` over the defaults; an unknown or missing column is a TypeError
    (the columns are listed once, here)."""
    unknown = [k for k in fields if k not in LOGICAL_COLUMNS]
    row = {k: fields[k] if k in fields else _ROW_DEFAULTS.get(k, ...) for k in LOGICAL_COLUMNS}
    missing = [k for k, v in row.items() if v is ...]
    if unknown or missing:
        raise TypeError(f"shard row: unknown columns {unknown}, missing {missing}")
    return row


DICTIONARY_COLUMNS = ["source", "split", "emotion", "teacher_emotion", "teacher_finish_reason"]
# Byte-stream-split (each byte position of the values in a stream of its own, so zstd finds the
# bytes that repeat: exponents, the high bytes of ids). Parquet applies an encoding to a leaf, so
# nested columns are named by their leaf path.
SPLIT_LEAVES = [
    "topk_token_ids.list.element.list.element",
    "topk_top1_logprob.list.element",
    "topk_logrest.list.element",
    "topk_gap_steps.list.element.list.element",
    "target_logprob.list.element",
    "teacher_features_q8.list.element",
]
ENCODED = {  # logical column -> the stored columns it is decoded from
    "topk_logprobs": ["topk_top1_logprob", "topk_logrest", "topk_gap_steps"],
    "teacher_features": ["teacher_features_q8", "teacher_features_scale"],
}


ENCODED_STORED = {"topk_token_ids", *(c for cols in ENCODED.values() for c in cols)}


def stored_columns(logical: list[str]) -> list[str]:
    """The stored columns a reader must read to get these logical ones."""
    return [c for name in logical for c in ENCODED.get(name, [name])]


class CacheSettings(TypedDict):
    """What every shard of one cache folder shares, and the consumer checks (`make_settings`)."""

    schema_version: int
    encoding: dict[str, Any]  # ENCODING: how the top-k and the features are stored
    teacher_weights_sha256: str
    tokenizer_fingerprint: str
    vocab_size: int
    top_k: int
    logprob_mode: str
    temperature: float
    top_p: float
    max_new_tokens: int
    sampling: dict[str, Any]  # teacher.sampling: penalties etc. passed to vLLM (logprobs stay raw)
    reply_sampling: dict[str, Any] | None  # teacher.reply_sampling: the same for reply turns only
    prompt_template_sha256: str
    feature_dim: int | None
    media: dict[str, Any] | None  # frames / image size a VLM teacher saw (None for text)


SETTING_KEYS = tuple(CacheSettings.__annotations__)


def make_settings(**values: Any) -> CacheSettings:
    """A settings dict with every key (the schema version and encoding are this code's), or a
    TypeError naming what is missing or unknown: a key cannot silently go missing in one copy."""
    values = {"schema_version": SCHEMA_VERSION, "encoding": ENCODING, **values}
    missing = [k for k in SETTING_KEYS if k not in values]
    unknown = [k for k in values if k not in SETTING_KEYS]
    if missing or unknown:
        raise TypeError(f"cache settings: missing {missing}, unknown {unknown}")
    return CacheSettings(**{k: values[k] for k in SETTING_KEYS})  # type: ignore[typeddict-item]


class ShardEntry(TypedDict):
    """One shard in manifest.json."""

    file: str
    rows: int
    reply_tokens: int
    bytes: int
    sha256: str


def shard_entry(path: Path, rows: int, reply_tokens: int) -> ShardEntry:
    return ShardEntry(
        file=path.name,
        rows=rows,
        reply_tokens=reply_tokens,
        bytes=path.stat().st_size,
        sha256=file_sha256(path),
    )


# ----------------------------------------------------------------------------- top-k encoding


def encode_topk(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, K] log-probabilities (each row descending) -> top-1 [N] float32, log of the mass of
    ranks 2..k [N] float32 (-inf when k = 1), gap-code steps [N, K-1] uint8 (module docstring)."""
    lp = np.asarray(logprobs, dtype=np.float64).reshape(len(logprobs), -1)
    if lp.shape[1] == 0:
        raise ValueError("a top-k of k = 0")
    top1 = lp[:, 0]
    with np.errstate(divide="ignore"):
        rest = np.logaddexp.reduce(lp[:, 1:], axis=1) if lp.shape[1] > 1 else np.log(0 * top1)
    gaps = np.maximum(top1[:, None] - lp[:, 1:], 0.0)  # ties (and -0.0) give code 0
    codes = np.minimum(np.rint(np.sqrt(gaps) / GAP_STEP), 255).astype(np.uint8)
    steps = np.diff(codes, axis=1, prepend=np.uint8(0))  # uint8: mod 256, so always exact
    return top1.astype(np.float32), rest.astype(np.float32), steps


def decode_topk(top1: np.ndarray, logrest: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The inverse of `encode_topk`: [N, K] float32 log-probabilities whose top-1 and the mass
    of ranks 2..k are the stored ones, so the tail bucket beyond the k ids is exact too."""
    top1 = np.asarray(top1, dtype=np.float64)
    codes = np.cumsum(np.asarray(steps, dtype=np.uint8), axis=1, dtype=np.uint8)  # mod 256
    rest = top1[:, None] - (codes.astype(np.float64) * GAP_STEP) ** 2
    if rest.shape[1]:
        # Scale ranks 2..k together to their stored mass: their rounding errors then cancel
        # in the tail instead of adding up there.
        want = np.asarray(logrest, dtype=np.float64)
        have = np.logaddexp.reduce(rest, axis=1)
        fix = np.where(np.isfinite(want) & np.isfinite(have), want - have, 0.0)
        rest += fix[:, None]
    return np.concatenate([top1[:, None], rest], axis=1).astype(np.float32)


def encode_features(features: Any) -> tuple[np.ndarray, float]:
    """A feature vector -> int8 codes and the scale max|f| (0 for an empty or zero vector)."""
    f = np.asarray(features, dtype=np.float64).ravel()
    scale = float(np.abs(f).max()) if f.size else 0.0
    q = np.rint(f / scale * 127) if scale > 0 else np.zeros_like(f)
    return q.astype(np.int8), scale


def bucket_kl(exact: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Per-token KL(exact || decoded) between the (K+1)-bucket distributions that the losses
    build from two [N, K] top-k log-probabilities (the k ids, then the tail beyond them): the
    accuracy contract of the encoding (mean at most 1e-3 nats)."""

    def buckets(lp: np.ndarray) -> np.ndarray:
        lp = np.asarray(lp, dtype=np.float64)
        tail = np.log(np.maximum(-np.expm1(np.logaddexp.reduce(lp, axis=1)), 1e-12))
        return np.concatenate([lp, tail[:, None]], axis=1)

    p, q = buckets(exact), buckets(decoded)
    return np.sum(np.exp(p) * (p - q), axis=1)


def _nested(values: np.ndarray, lengths: list[int], width: int, type_: pa.DataType) -> pa.Array:
    """list<list<type_>>: rows of `lengths` tokens, each token `width` values of `values`."""
    tokens = pa.ListArray.from_arrays(
        pa.array(np.arange(0, len(values) * width + 1, width, dtype=np.int32)),
        pa.array(values.reshape(-1), type=type_),
    )
    return pa.ListArray.from_arrays(pa.array(np.cumsum([0, *lengths], dtype=np.int32)), tokens)


def _flat(values: np.ndarray, lengths: list[int], type_: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(
        pa.array(np.cumsum([0, *lengths], dtype=np.int32)), pa.array(values, type=type_)
    )


def encode_rows(rows: list[dict[str, Any]], top_k: int | None = None) -> pa.Table:
    """Logical rows -> the stored table (top-k and features encoded), in one vectorised pass."""
    k = top_k or next((len(r["topk_token_ids"][0]) for r in rows if r["topk_token_ids"]), 1)
    lengths = [len(r["topk_token_ids"]) for r in rows]
    ids = np.asarray([t for r in rows for t in r["topk_token_ids"]], dtype=np.int32)
    lps = np.asarray([t for r in rows for t in r["topk_logprobs"]], dtype=np.float32)
    top1, rest, steps = encode_topk(lps.reshape(len(ids), k) if len(ids) else np.zeros((0, k)))
    plain = [name for name in SHARD_SCHEMA.names if name not in ENCODED_STORED]
    columns = {
        name: pa.array([r.get(name) for r in rows], SHARD_SCHEMA.field(name).type) for name in plain
    }
    columns["topk_token_ids"] = _nested(ids.reshape(-1, k), lengths, k, pa.int32())
    columns["topk_top1_logprob"] = _flat(top1, lengths, pa.float32())
    columns["topk_logrest"] = _flat(rest, lengths, pa.float32())
    columns["topk_gap_steps"] = _nested(steps, lengths, k - 1, pa.uint8())
    feats = [encode_features(r.get("teacher_features", [])) for r in rows]
    columns["teacher_features_q8"] = _flat(
        np.concatenate([q for q, _ in feats]) if feats else np.zeros(0, np.int8),
        [len(q) for q, _ in feats],
        pa.int8(),
    )
    columns["teacher_features_scale"] = pa.array([sc for _, sc in feats], pa.float32())
    return pa.table([columns[name] for name in SHARD_SCHEMA.names], schema=SHARD_SCHEMA)


def write_shard(
    rows: list[dict[str, Any]],
    path: Path,
    row_group_size: int,
    metadata: dict[str, str] | None = None,
    writer: str = "local",
    top_k: int | None = None,
) -> ShardEntry:
    """Write logical rows as one shard under a temporary name, then rename; return its manifest
    entry.

    `metadata` goes into the Parquet footer, so a shard renamed just before a kill (and so not yet
    in the manifest) can still be checked and adopted by the next run."""
    table = encode_rows(rows, top_k).replace_schema_metadata(metadata or {})
    tmp = temp_path(path, writer)
    pq.write_table(
        table,
        tmp,
        row_group_size=row_group_size,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        # Dictionary encoding only where values repeat; numeric leaves are byte-stream-split.
        use_dictionary=DICTIONARY_COLUMNS,
        use_byte_stream_split=SPLIT_LEAVES,
    )
    os.replace(tmp, path)
    return shard_entry(path, table.num_rows, sum(len(r["response_token_ids"]) for r in rows))


def decode_table(table: pa.Table) -> list[dict[str, Any]]:
    """Stored rows -> logical rows, vectorised over the table: `topk_token_ids` [T, K] int32 and
    `topk_logprobs` [T, K] float32 arrays, `teacher_features` float32 arrays; the rest as stored.
    Only the columns the table holds are decoded (see `stored_columns`)."""
    names = set(table.column_names)
    plain = [n for n in table.column_names if n not in ENCODED_STORED]
    rows = table.select(plain).to_pylist() if plain else [{} for _ in range(table.num_rows)]

    def values(name: str) -> tuple[np.ndarray, Any]:  # offsets, the child pyarrow array
        col = table.column(name).combine_chunks()
        return col.offsets.to_numpy(), col.values

    if "topk_token_ids" in names:
        offsets, tokens = values("topk_token_ids")
        k = len(tokens[0]) if len(tokens) else 0
        flat = tokens.values.to_numpy(zero_copy_only=False).astype(np.int32).reshape(-1, k or 1)
        for r, lo, hi in zip(rows, offsets[:-1], offsets[1:], strict=True):
            r["topk_token_ids"] = flat[lo:hi] if k else np.zeros((0, 0), np.int32)
    if "topk_gap_steps" in names:
        offsets, top1 = values("topk_top1_logprob")
        _, rest = values("topk_logrest")
        _, steps = values("topk_gap_steps")
        n = len(top1)
        width = len(steps.values) // n if n else 0
        lps = decode_topk(
            top1.to_numpy(zero_copy_only=False),
            rest.to_numpy(zero_copy_only=False),
            steps.values.to_numpy(zero_copy_only=False).reshape(n, width),
        )
        for r, lo, hi in zip(rows, offsets[:-1], offsets[1:], strict=True):
            r["topk_logprobs"] = lps[lo:hi]
    if "teacher_features_q8" in names:
        offsets, q8 = values("teacher_features_q8")
        flat = q8.to_numpy(zero_copy_only=False).astype(np.float32) / 127
        scales = table.column("teacher_features_scale").to_numpy().astype(np.float32)
        for r, lo, hi, scale in zip(rows, offsets[:-1], offsets[1:], scales, strict=True):
            r["teacher_features"] = flat[lo:hi] * scale
    return rows


def read_rows(path: Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """A shard's rows in their logical form (`columns`: logical names; None: all)."""
    stored = None if columns is None else stored_columns(columns)
    return decode_table(pq.read_table(path, columns=stored))


def check_pairs(folder: Path, manifest: dict[str, Any]) -> None:
    """For sft-dpo: refuse a cache without preference pairs (an answer-mode cache) before
    anything heavy."""
    for entry in manifest["shards"]:
        column = pq.read_table(Path(folder) / entry["file"], columns=["base_response"]).column(0)
        if any((text or "").strip() for text in column.to_pylist()):
            return
    raise PipelineError(
        f"{folder}: no row has a base_response, so there are no preference pairs for sft-dpo; "
        "build an improve-mode cache (--set teacher_cache.mode=improve, its own output) first"
    )


def check_shard_files(folder: Path, manifest: dict[str, Any], columns: list[str]) -> None:
    """Refuse a shard whose own columns or footer settings disagree with the manifest.

    `verify_cache` checks the manifest against the student and each shard's row count and
    checksum; this adds what only the shard itself can say: a file copied in from another cache
    (other tokenizer, k or schema) that was listed by hand, or a shard missing columns."""
    want = manifest.get("settings", {})
    stored = stored_columns(columns)
    for entry in manifest.get("shards", []):
        path = Path(folder) / entry["file"]
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as e:
            raise PipelineError(f"{path}: unreadable shard ({e}); delete it and rerun") from None
        missing = [c for c in stored if c not in schema.names]
        have = {c: schema.field(c).type for c in stored if c in schema.names}
        wrong = [c for c, t in have.items() if t != SHARD_SCHEMA.field(c).type]
        if missing or wrong:
            raise PipelineError(
                f"{path}: not a shard of this schema (missing {missing or 'none'}, wrong type "
                f"{wrong or 'none'}); rebuild it with this version of `pipeline teacher-cache`"
            )
        raw = (schema.metadata or {}).get(b"pipeline_settings", b"{}")
        diff = settings_mismatch(json.loads(raw), want)
        if diff:
            raise PipelineError(
                f"{path}: made with other settings than the manifest ({'; '.join(diff)}); "
                "delete it and rerun `pipeline teacher-cache`"
            )


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
            f"{folder}: cache has top-k {s.get('top_k')} but {top_k} was asked for "
            "(distill.expect_top_k); set the same k, or rebuild the cache"
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
