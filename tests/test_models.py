"""The teacher's weight hash: computed once per file set, remembered, recomputed on a change."""

import os

import pytest

from shared import models


def test_weight_hash_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("EMPATHY_DISTILL_HASH_CACHE", str(tmp_path / "hashes.json"))
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "model-00001.safetensors").write_bytes(b"a" * 1000)
    (folder / "model-00002.safetensors").write_bytes(b"b" * 1000)
    first = models.model_sha256(folder)
    assert first == models.weights_sha256(folder)

    calls = []
    real = models.weights_sha256
    monkeypatch.setattr(models, "weights_sha256", lambda f: calls.append(f) or real(f))
    assert models.model_sha256(folder) == first and calls == []  # remembered: no pass

    # same size, new bytes: the modification time moves, so the folder is hashed again
    shard = folder / "model-00002.safetensors"
    shard.write_bytes(b"c" * 1000)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    second = models.model_sha256(folder)
    assert len(calls) == 1 and second != first
    # a damaged cache file costs one more pass, never an error
    (tmp_path / "hashes.json").write_text("{oops")
    assert models.model_sha256(folder) == second and len(calls) == 2
    with pytest.raises(models.PipelineError, match="no \\*.safetensors"):
        models.model_sha256(tmp_path)
