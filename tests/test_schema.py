"""The shard contract: writing, the manifest, and the consumer's refusals."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import row

from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.schema import (
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    read_manifest,
    read_rows,
    verify_cache,
    write_manifest,
    write_shard,
)


def test_shard_round_trip_and_row_groups(cache):
    f = pq.ParquetFile(cache / "shard-00000.parquet")
    assert f.schema_arrow.remove_metadata() == SHARD_SCHEMA
    assert f.metadata.num_row_groups == 2  # row_group_size=1
    first = read_rows(cache / "shard-00000.parquet")[0]
    assert first["privileged"] == [("situation", "s")]
    ids, lps = first["topk_token_ids"], first["topk_logprobs"]
    assert ids.shape == lps.shape == (2, 3) and ids[1, 0] == 11
    assert not list(cache.glob("*.tmp"))


def test_verify_accepts_a_matching_cache(cache):
    m = verify_cache(cache, tokenizer_fingerprint="tok", vocab_size=100, top_k=3)
    assert [e["rows"] for e in m["shards"]] == [2, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokenizer_fingerprint": "other"}, "tokenizer"),
        ({"vocab_size": 99}, "vocabulary"),
        ({"top_k": 5}, "top-k 3"),
    ],
)
def test_verify_refuses_a_mismatch(cache, kwargs, match):
    with pytest.raises(PipelineError, match=match):
        verify_cache(cache, **kwargs)


def test_verify_refuses_schema_version(cache):
    m = read_manifest(cache)
    m["settings"]["schema_version"] = SCHEMA_VERSION + 1
    write_manifest(cache, m)
    with pytest.raises(PipelineError, match="schema version"):
        verify_cache(cache)


def test_verify_names_a_changed_shard(cache):
    shard = cache / "shard-00001.parquet"
    write_shard([row(7), row(8)], shard, 1)  # same row count, other bytes
    with pytest.raises(PipelineError, match="shard-00001.parquet: checksum"):
        verify_cache(cache)


def test_verify_names_a_row_count_mismatch_and_missing_shard(cache):
    m = read_manifest(cache)
    m["shards"][0]["rows"] = 5
    write_manifest(cache, m)
    with pytest.raises(PipelineError, match="shard-00000.parquet: 2 rows but the manifest says 5"):
        verify_cache(cache)
    (cache / "shard-00000.parquet").unlink()
    with pytest.raises(PipelineError, match="missing"):
        verify_cache(cache)


def test_verify_without_manifest(tmp_path):
    with pytest.raises(PipelineError, match="not a teacher cache"):
        verify_cache(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(PipelineError, match="unreadable"):
        verify_cache(tmp_path)


def test_manifest_write_is_atomic(tmp_path):
    write_manifest(tmp_path, {"a": 1})
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}
    assert not list(tmp_path.glob("*.tmp"))
