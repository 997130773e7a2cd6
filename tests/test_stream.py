"""The shard stream: deterministic by seed, disjoint per rank, exact to resume, new shards next."""

from __future__ import annotations

import itertools

from conftest import make_cache

from empathy_distill.shared.schema import read_manifest
from empathy_distill.stage2_distill.stream import ShardStream


def _ids(stream, n):
    return [row["example_id"] for row in itertools.islice(stream, n)]


def _cache(tmp_path, tiny_student, **kw):
    from empathy_distill.shared.models import load_tokenizer

    folder = tmp_path / "cache"
    make_cache(folder, load_tokenizer(tiny_student), **kw)
    return folder, read_manifest(folder)["shards"]


def test_one_pass_is_a_permutation_and_seeded(tmp_path, tiny_student):
    folder, shards = _cache(tmp_path, tiny_student, shards=3, rows=10, row_group_size=3)
    first = _ids(ShardStream(folder, shards, seed=1, buffer_size=5), 30)
    assert sorted(first) == sorted(f"ex{s * 1000 + j:05d}" for s in range(3) for j in range(10))
    assert first == _ids(ShardStream(folder, shards, seed=1, buffer_size=5), 30)
    assert first != _ids(ShardStream(folder, shards, seed=2, buffer_size=5), 30)


def test_ranks_read_disjoint_parts(tmp_path, tiny_student):
    folder, shards = _cache(tmp_path, tiny_student, shards=2, rows=12, row_group_size=3)
    a = ShardStream(folder, shards, rank=0, world_size=2, buffer_size=4)
    b = ShardStream(folder, shards, rank=1, world_size=2, buffer_size=4)
    ids_a, ids_b = set(_ids(a, 12)), set(_ids(b, 12))
    assert not ids_a & ids_b and len(ids_a | ids_b) == 24


def test_restored_state_continues_exactly(tmp_path, tiny_student):
    folder, shards = _cache(tmp_path, tiny_student, shards=2, rows=10, row_group_size=3)
    keep = lambda row: row["example_id"] != "ex00004"  # noqa: E731
    whole = _ids(ShardStream(folder, shards, seed=3, buffer_size=4, keep=keep), 50)
    stream = ShardStream(folder, shards, seed=3, buffer_size=4, keep=keep)
    head = _ids(stream, 23)  # mid-pass, mid-row-group, buffer full
    state = stream.state_dict()
    resumed = ShardStream(folder, shards, seed=3, buffer_size=4, keep=keep, state=state)
    assert head + _ids(resumed, 27) == whole
    assert "ex00004" not in whole


def test_new_shards_are_read_next(tmp_path, tiny_student):
    from empathy_distill.shared.models import load_tokenizer

    folder, shards = _cache(tmp_path, tiny_student, shards=2, rows=8, row_group_size=4)
    stream = ShardStream(folder, shards, buffer_size=1)
    _ids(stream, 5)
    state = stream.state_dict()
    added = make_cache(folder, load_tokenizer(tiny_student), shards=1, rows=8)
    new = [s for s in read_manifest(folder)["shards"] if s["file"] in added]
    resumed = ShardStream(folder, shards, buffer_size=1, state=state)
    resumed.add_shards(new)
    # 5 rows = one row group of 4 and 1 of the next: that group is finished, then the new shard.
    got = _ids(resumed, 3 + 8)
    assert got[3:] == [f"ex{2000 + j:05d}" for j in range(8)]
    assert added[0] in resumed.state_dict()["known"]
