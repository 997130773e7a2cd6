"""What a rerun of `teacher-cache` makes of its own folder: the repairs after a kill or a hand,
the refusals that name a damaged file, and `--limit` as the first N examples of the inputs."""

import pytest
from conftest import settings
from transformers import AutoTokenizer

from empathy_distill.shared.config import load_config
from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.readers import read_examples
from empathy_distill.shared.schema import read_manifest


def test_a_rerun_repairs_or_names_what_a_kill_or_a_hand_left(cache, capsys):
    """teacher-cache's view of its own folder (reconcile_shards): a gone shard is redone, a
    damaged one or an unlisted copy of cached examples stops the run naming the file."""
    import shutil

    from empathy_distill.stage1_teacher.teacher_cache import gate_rejects, reconcile_shards

    manifest = read_manifest(cache)
    assert reconcile_shards(cache, manifest, settings()) == {"id0", "id10", "id1", "id11"}
    (cache / "shard-00001.parquet").unlink()
    manifest = read_manifest(cache)
    assert reconcile_shards(cache, manifest, settings()) == {"id0", "id10"}  # the rest is redone
    assert [e["file"] for e in manifest["shards"]] == ["shard-00000.parquet"]
    assert "listed but gone" in capsys.readouterr().out
    shutil.copy(cache / "shard-00000.parquet", cache / "shard-00007.parquet")
    with pytest.raises(PipelineError, match="already in shard-00000.parquet"):
        reconcile_shards(cache, read_manifest(cache), settings())
    (cache / "shard-00007.parquet").write_bytes(b"not parquet")
    with pytest.raises(PipelineError, match="shard-00007.parquet: damaged or not a shard"):
        reconcile_shards(cache, read_manifest(cache), settings())
    # two listed shards that hold the same example: the merge refuses, naming both
    manifest = read_manifest(cache)
    manifest["shards"].append({**manifest["shards"][0], "file": "shard-00007.parquet"})
    shutil.copy(cache / "shard-00000.parquet", cache / "shard-00007.parquet")
    with pytest.raises(PipelineError, match="id0 is in both shard-00000.parquet and shard-00007"):
        reconcile_shards(cache, manifest, settings())
    (cache / "shard-00007.parquet").unlink()
    data = (cache / "shard-00000.parquet").read_bytes()
    (cache / "shard-00000.parquet").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(PipelineError, match="shard-00000.parquet: damaged"):
        reconcile_shards(cache, read_manifest(cache), settings())
    (cache / "rejects.jsonl").write_text('{"origin": "a", "reason": "b"}\n{oops\n')
    with pytest.raises(PipelineError, match="line 2 is not a reject record"):
        gate_rejects(cache, {"x"})


@pytest.mark.parametrize("damage", ["gone", "truncated", "not parquet", "rejects"])
def test_inspect_names_what_is_wrong(cache, damage):
    from empathy_distill.stage1_teacher.inspect_cache import main as inspect

    shard = cache / "shard-00001.parquet"
    if damage == "gone":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "not parquet":
        shard.write_text("hello")
    else:
        (cache / "rejects.jsonl").write_text("[1]\n")
    with pytest.raises(PipelineError) as err:
        inspect(cache)
    assert "\n" not in str(err.value)
    assert ("rejects.jsonl" if damage == "rejects" else "shard-00001.parquet") in str(err.value)


def test_limit_is_the_first_n_examples_so_a_resumed_run_equals_an_uninterrupted_one(
    tmp_path, embedded_teacher
):
    from conftest import DATA, REPO

    from empathy_distill.stage1_teacher.teacher_cache import plan_work

    cfg = load_config(REPO / "pipelines.yaml", "demo", ["teacher_cache.limit=4"])
    tok = AutoTokenizer.from_pretrained(embedded_teacher)
    examples, _ = read_examples(DATA / "ed_sample.csv")
    ids = [e.example_id for e in examples]
    pending, counts, _ = plan_work(cfg, tok, examples, set())
    assert [e.example_id for e, _ in pending] == ids[:4]
    killed = set(ids[:2])  # a run killed after its first shard
    pending, counts, _ = plan_work(cfg, tok, examples, killed)
    assert [e.example_id for e, _ in pending] == ids[2:4]  # not ids[2:6]
    assert counts["deferred"] == len(ids) - 4
    assert plan_work(cfg, tok, examples, set(ids[:4]))[0] == []


def test_one_writer_per_folder_and_a_stale_lock_is_taken_over(tmp_path):
    import json
    import os
    import socket
    import subprocess

    from empathy_distill.stage1_teacher.teacher_cache import LOCK, writer_lock

    with writer_lock(tmp_path):
        held = json.loads((tmp_path / LOCK).read_text())
        assert held == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(PipelineError, match=f"in use by teacher-cache pid {os.getpid()}"):
            with writer_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK).exists()  # released
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that has exited
    (tmp_path / LOCK).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    with writer_lock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
