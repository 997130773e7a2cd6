"""The stored top-k and features (shared/schema.py): accuracy against the exact values, edge
cases, and the round trip through a real Parquet shard."""

import numpy as np
import pytest

from empathy_distill.shared import schema


def topk_of(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k ids and float32 log-probabilities of rows of logits, written out naively."""
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    logp -= logits.max(1, keepdims=True)
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(logp, ids, 1).astype(np.float32)


@pytest.mark.parametrize("k", [1, 2, 20, 64, 128])
@pytest.mark.parametrize("peak", [0.5, 3.0, 12.0])  # flat to very peaked teachers
def test_decoded_topk_meets_the_contract(k, peak):
    rng = np.random.default_rng(k * 10 + int(peak))
    logits = rng.standard_normal((400, 1000)) * peak
    _, exact = topk_of(logits, k)
    decoded = schema.decode_topk(*schema.encode_topk(exact))
    assert decoded.shape == exact.shape and decoded.dtype == np.float32
    assert np.abs(decoded[:, 0] - exact[:, 0]).max() < 1e-6  # the top-1 is stored as it is
    kl = schema.bucket_kl(exact, decoded)
    assert kl.mean() <= 1e-3 and kl.min() >= -1e-9
    # the tail bucket is exact: the decoded top-k mass is the exact one (to float32)
    mass = np.logaddexp.reduce(exact.astype(np.float64), axis=1)
    assert np.abs(np.logaddexp.reduce(decoded.astype(np.float64), axis=1) - mass).max() < 1e-5


def test_identical_distributions_give_zero_and_edges_decode():
    lp = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    assert schema.bucket_kl(lp, lp)[0] == pytest.approx(0.0, abs=1e-12)
    # k = vocabulary: the tail is empty on both sides
    assert schema.bucket_kl(lp, schema.decode_topk(*schema.encode_topk(lp)))[0] < 1e-6
    # ties give code 0; an entry beyond the last code clips to it (104 nats down), finite
    far = np.array([[-0.01, -0.01, -500.0]], dtype=np.float32)
    top1, rest, codes = schema.encode_topk(far)
    assert codes.tolist() == [[0, 255]]
    back = schema.decode_topk(top1, rest, codes)
    assert np.isfinite(back).all() and back[0, 0] == far[0, 0]
    with pytest.raises(ValueError):
        schema.encode_topk(np.zeros((2, 0)))
    # the steps are mod 256: ranks out of order (a hand-made cache) still decode to their codes
    unsorted = np.array([[-0.1, -5.0, -2.0]], dtype=np.float32)
    top1, rest, steps = schema.encode_topk(unsorted)
    assert steps[0, 1] > 128  # a negative step, wrapped
    assert np.abs(schema.decode_topk(top1, rest, steps) - unsorted).max() < 0.1


def test_a_shard_round_trip_decodes_what_was_written(tmp_path):
    from conftest import row

    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        r = row(i, k=3, n=4 if i else 0)  # one row without reply tokens
        _, r["topk_logprobs"] = topk_of(rng.standard_normal((len(r["topk_token_ids"]), 50)), 3)
        r["teacher_features"] = (rng.standard_normal(64) / 8).tolist()
        rows.append(r)
    entry = schema.write_shard(rows, tmp_path / "shard-00000.parquet", 2, top_k=3)
    assert entry["rows"] == 5 and entry["reply_tokens"] == 16
    back = schema.read_rows(tmp_path / "shard-00000.parquet")
    for r, b in zip(rows, back, strict=True):
        assert b["example_id"] == r["example_id"] and b["dialogue"] == r["dialogue"]
        assert np.array_equal(b["topk_token_ids"], np.asarray(r["topk_token_ids"]).reshape(-1, 3))
        if len(r["topk_logprobs"]):
            kl = schema.bucket_kl(r["topk_logprobs"], b["topk_logprobs"])
            assert kl.max() < 1e-3
        f, g = np.asarray(r["teacher_features"]), b["teacher_features"]
        assert g.dtype == np.float32 and f @ g / np.linalg.norm(f) / np.linalg.norm(g) > 0.9999
        assert np.abs(f).max() == pytest.approx(np.abs(g).max(), rel=1e-6)  # the row's scale
    # only the asked-for logical columns are read and decoded
    part = schema.read_rows(tmp_path / "shard-00000.parquet", ["example_id", "topk_logprobs"])
    assert set(part[1]) == {"example_id", "topk_logprobs"}
    # numeric leaves are byte-stream-split (Parquet applies encodings per leaf path)
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(tmp_path / "shard-00000.parquet").metadata.row_group(0)
    split = {
        meta.column(i).path_in_schema
        for i in range(meta.num_columns)
        if "BYTE_STREAM_SPLIT" in meta.column(i).encodings
    }
    assert split == set(schema.SPLIT_LEAVES)


def test_settings_have_every_key_or_none():
    with pytest.raises(TypeError, match="missing"):
        schema.make_settings(top_k=3)
    full = {k: None for k in schema.SETTING_KEYS if k not in ("schema_version", "encoding")}
    made = schema.make_settings(**full)
    assert made["schema_version"] == schema.SCHEMA_VERSION
    assert made["encoding"] == schema.ENCODING
    with pytest.raises(TypeError, match="unknown"):
        schema.make_settings(**full, extra=1)
