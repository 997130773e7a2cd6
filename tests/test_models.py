"""Model folders: the teacher's weight hash (computed once per file set, remembered, recomputed
on a change), and the embedded models built only on request, never over a user's folder."""

import json
import os

import pytest

from empathy_distill.shared import models


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


def test_models_are_checked_never_built_or_overwritten(tmp_path, embedded_models):
    """check_model never builds; build_model (`pipeline setup-models`) builds only embedded
    names, keeps an intact build, and never touches a folder it did not build."""
    missing = tmp_path / models.TEACHER_NAME
    with pytest.raises(models.PipelineError, match="pipeline setup-models"):
        models.check_model(missing)
    with pytest.raises(models.PipelineError, match="Hugging Face model folder"):
        models.check_model(tmp_path / "my-teacher")
    assert not missing.exists()

    # a user's folder that happens to carry the embedded name: left exactly as it is
    (missing / "config.json").parent.mkdir()
    (missing / "config.json").write_text("{}")
    with pytest.raises(models.PipelineError, match="left as it is"):
        models.build_model(missing)
    assert [p.name for p in missing.iterdir()] == ["config.json"]
    assert models.check_model(missing) == missing  # not ours: only its config.json is asked for

    # one we built whose weights changed since: refused, with the way out
    ours = tmp_path / "smollm2-135m-student-2l"
    ours.mkdir()
    (ours / "config.json").write_text("{}")
    (ours / "model.safetensors").write_bytes(b"x" * 100)
    (ours / models.MARKER).write_text(json.dumps({"recipe": "r", "weights_sha256": "0" * 64}))
    with pytest.raises(models.PipelineError, match="setup-models --rebuild"):
        models.check_model(ours)

    # the embedded folders the session built: intact, so nothing is built again
    teacher, student = embedded_models
    assert models.build_model(teacher) is False and models.build_model(student) is False
    with pytest.raises(models.PipelineError, match="not an embedded model"):
        models.build_model(tmp_path / "other")


def test_engine_key_is_the_architecture_not_the_weights(tmp_path, embedded_teacher):
    """Two seeds of one architecture share an engine (`evaluate.reuse_engine`); another width,
    other stop tokens in the generation config, or another vocabulary do not."""
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    def tiny(name: str, **kw):
        folder = tiny_llama(tmp_path / name, embedded_teacher, num_attention_heads=2, **kw)
        return models.engine_key(folder, AutoTokenizer.from_pretrained(folder))

    a = tiny("a", hidden_size=64)
    assert tiny("b", hidden_size=64, seed=1) == a
    assert tiny("wider", hidden_size=128) != a
    stops = tmp_path / "stops"
    tiny_llama(stops, embedded_teacher, num_attention_heads=2, hidden_size=64)
    config = json.loads((stops / "generation_config.json").read_text())
    (stops / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [0, 2]}))
    assert models.engine_key(stops, AutoTokenizer.from_pretrained(stops)) != a
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    tok.add_tokens(["<extra-token>"])
    assert models.engine_key(tmp_path / "a", tok) != a
