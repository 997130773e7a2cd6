"""`pipeline distill` end to end on a tiny random Llama (2 layers, hidden 64) with the real SmolLM2
tokenizer, synthetic shards written through shared.schema, and the real DeepSpeed engine on the CPU.

The tiny student, the synthetic cache and the config come from the kit in conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, losses_by_step, make_cache, make_config, run

from empathy_distill.shared.config import load_config
from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.schema import (
    MANIFEST,
    read_manifest,
    write_manifest,
)


@pytest.fixture
def cache(tmp_path, tiny_student) -> Path:
    from empathy_distill.shared.models import load_tokenizer

    folder = tmp_path / "cache"
    make_cache(folder, load_tokenizer(tiny_student))
    return folder


# ----------------------------------------------------------------------------- refusals


def _edit_manifest(folder: Path, fn) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    fn(manifest)
    write_manifest(folder, manifest)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda m, f: m["settings"].update(schema_version=99), "schema version"),
        (lambda m, f: m["settings"].update(tokenizer_fingerprint="0000"), "tokenizer"),
        (lambda m, f: m["settings"].update(vocab_size=50), "vocabulary"),
        (lambda m, f: m["shards"][1].update(sha256="0" * 64), "checksum"),
        (lambda m, f: m["shards"][0].update(rows=13), "rows but the manifest says"),
        (
            lambda m, f: m["shards"].append({**m["shards"][0], "file": "shard-00009.parquet"}),
            "missing",
        ),
        (lambda m, f: m["shards"].append(dict(m["shards"][0])), "listed twice"),
    ],
)
def test_manifest_refusals(tmp_path, tiny_student, cache, breakage, message):
    _edit_manifest(cache, lambda m: breakage(m, cache))
    with pytest.raises(PipelineError, match=message):
        run(tmp_path, tiny_student, cache, tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before any work


def test_refuses_other_k(tmp_path, tiny_student, cache):
    with pytest.raises(PipelineError, match="top-k 4 but 5"):
        run(tmp_path, tiny_student, cache, tmp_path / "out", expect_top_k=5)


def test_refuses_shard_from_another_cache(tmp_path, tiny_student, cache):
    """A shard copied in from a cache with another k, listed with a correct checksum."""
    from empathy_distill.shared.models import load_tokenizer

    other = tmp_path / "other"
    make_cache(other, load_tokenizer(tiny_student), shards=1, k=3)
    shutil.copy(other / "shard-00000.parquet", cache / "shard-00000.parquet")
    entry = read_manifest(other)["shards"][0]
    _edit_manifest(cache, lambda m: m["shards"].__setitem__(0, entry))
    with pytest.raises(PipelineError, match=r"shard-00000.parquet: made with other settings.*k"):
        run(tmp_path, tiny_student, cache, tmp_path / "out")


# ----------------------------------------------------------------------------- training


def test_pride_trains_exports_and_writes_outputs(tmp_path, tiny_student, cache):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    before = launcher & set(os.environ)
    summary = run(tmp_path, tiny_student, cache, out, max_steps=3, checkpoint_every=2)
    assert launcher & set(os.environ) == before  # no launcher variables left behind
    assert summary["steps"] == "0 -> 3 (of 3)"
    names = ("resolved_config.yaml", "metrics.jsonl", "loss.png", "summary.json", "tensorboard")
    for name in names:
        assert (out / name).exists(), name
    steps = losses_by_step(out)
    assert sorted(steps) == [1, 2, 3]
    assert set(steps[1]) == {"step", "ce", "rkl", "mmd", "loss"}
    assert all(np.isfinite(v) for row in steps.values() for v in row.values())
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 2
    plain = AutoModelForCausalLM.from_pretrained(tiny_student)
    assert set(model.state_dict()) == set(plain.state_dict())  # no extra modules exported
    assert (out / "final" / "tokenizer.json").exists()


def test_every_configurable_method_has_a_training():
    from empathy_distill.shared.config import METHOD_NAMES
    from empathy_distill.stage2_distill.distill import METHODS

    assert set(METHODS) == set(METHOD_NAMES)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["sft", "seqkd", "kd", "pride-no-pi", "pride-no-mmd", "pride-no-rkl"]
)
def test_each_method_runs(tmp_path, tiny_student, cache, method):
    terms = {
        "sft": {"ce"},
        "seqkd": {"ce"},
        "kd": {"ce", "fkl"},
        "pride-no-pi": {"ce", "rkl", "mmd"},
        "pride-no-mmd": {"ce", "rkl"},
        "pride-no-rkl": {"ce", "mmd"},
    }[method]
    out = tmp_path / "out"
    run(tmp_path, tiny_student, cache, out, method=method)
    steps = losses_by_step(out)
    assert set(steps[2]) == {"step", "loss", *terms}
    assert (out / "final" / "config.json").exists()


def test_resume_equals_uninterrupted(tmp_path, tiny_student, cache, monkeypatch):
    """Stop after step 3 (checkpoint at 2), resume: the same losses as one run of 5 steps."""
    from empathy_distill.stage2_distill import distill

    settings = {"max_steps": 5, "checkpoint_every": 2, "grad_accum": 2}
    run(tmp_path, tiny_student, cache, tmp_path / "whole", **settings)

    original = distill.log_step

    def crash_after_step_3(record, *args):
        original(record, *args)
        if record["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(distill, "log_step", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_student, cache, tmp_path / "split", **settings)
    monkeypatch.setattr(distill, "log_step", original)
    summary = run(tmp_path, tiny_student, cache, tmp_path / "split", **settings)
    assert summary["resumed from"] == "step0000002"
    whole, split = losses_by_step(tmp_path / "whole"), losses_by_step(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4, 5]  # the crashed run's step 3 line was replaced
    for step in whole:
        for key, value in whole[step].items():
            assert split[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


def test_new_shards_are_picked_up(tmp_path, tiny_student, cache):
    from empathy_distill.shared.models import load_tokenizer

    out = tmp_path / "out"
    run(tmp_path, tiny_student, cache, out)
    summary = run(tmp_path, tiny_student, cache, out)  # nothing new: nothing to do
    assert summary["steps"] == "2 -> 2 (of 2)" and summary["new shards"] == "none"
    added = make_cache(cache, load_tokenizer(tiny_student), shards=1, rows=6)
    summary = run(tmp_path, tiny_student, cache, out)
    assert summary["new shards"] == added[0]
    assert summary["steps"] == "2 -> 5 (of 5)"  # 6 new rows / 2 per step
    state = json.loads((out / "checkpoints" / "step0000005" / "run_state_rank0.json").read_text())
    assert added[0] in state["stream"]["known"]
    summary = run(tmp_path, tiny_student, cache, out, fresh=True)
    assert summary["resumed from"].startswith("no") and summary["steps"] == "0 -> 2 (of 2)"


@pytest.mark.slow
def test_two_ranks_under_torchrun(tmp_path, tiny_student, cache):
    out = tmp_path / "out"
    config = make_config(tmp_path, tiny_student, cache, out, max_steps=2)
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")  # a test's own group
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", "-m"]
    cmd += ["empathy_distill.stage2_distill.distill", "--config", str(config), "--pipeline", "t"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["rows trained"] == 8
    assert (out / "checkpoints" / "step0000002" / "run_state_rank1.json").exists()
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_other_zero_stages_train_and_export(tmp_path, tiny_student, cache, stage):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    zero = str(REPO / "configs" / f"zero{stage}.json")
    run(tmp_path, tiny_student, cache, out, deepspeed=zero, max_steps=3, checkpoint_every=2)
    summary = run(tmp_path, tiny_student, cache, out, deepspeed=zero, max_steps=4)
    assert summary["resumed from"] == "step0000003"
    plain = AutoModelForCausalLM.from_pretrained(tiny_student)
    exported = AutoModelForCausalLM.from_pretrained(out / "final")
    assert set(exported.state_dict()) == set(plain.state_dict())


def test_deepspeed_config_per_device(tmp_path, tiny_student, cache):
    """torch's Adam and fp32 on the CPU; torch's fused AdamW (nothing to compile), bf16 and fp32
    gradient accumulation on GPUs; a config's own torch_adam=false (FusedAdam) is kept."""
    from empathy_distill.stage2_distill.distill import deepspeed_config

    cfg = load_config(make_config(tmp_path, tiny_student, cache, tmp_path / "o", grad_accum=2), "t")
    cpu, gpu = deepspeed_config(cfg, 2, cuda=False), deepspeed_config(cfg, 2, cuda=True)
    assert cpu["optimizer"]["params"]["torch_adam"] and not cpu["bf16"]["enabled"]
    assert gpu["optimizer"]["params"]["fused"] and gpu["bf16"]["enabled"]
    assert gpu["data_types"]["grad_accum_dtype"] == "fp32" and "data_types" not in cpu
    assert gpu["train_batch_size"] == 2 * 2 * 2
    own = tmp_path / "fused.json"
    own.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": False}}}))
    cfg.distill.deepspeed = own
    fused = deepspeed_config(cfg, 1, cuda=True)["optimizer"]["params"]
    assert fused["torch_adam"] is False and "fused" not in fused


@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero2", "zero3"])
def test_gpu_deepspeed_configs_initialize_and_step(tmp_path, tiny_student, cache, zero):
    """What `deepspeed_config` gives a GPU (bf16, torch's fused AdamW, fp32 accumulation over
    2 micro-batches) is a mix DeepSpeed accepts under every shipped ZeRO file: initialised and
    stepped here on the CPU, whose DeepSpeed runs bf16 too. (ZeRO-0 with fp32 accumulation is
    one DeepSpeed refuses.)"""
    import deepspeed
    import torch

    from empathy_distill.stage2_distill.distill import (
        deepspeed_config,
        init_distributed,
        safe_checkpoint_engine,
    )

    zero_file = str(REPO / "configs" / f"{zero}.json")
    settings = {"grad_accum": 2, "deepspeed": zero_file}
    path = make_config(tmp_path, tiny_student, cache, tmp_path / "o", **settings)
    cfg = load_config(path, "t")
    ds = deepspeed_config(cfg, 1, cuda=True)
    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)).to(torch.bfloat16)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    assert engine.bfloat16_enabled()
    assert type(engine.basic_optimizer) is torch.optim.AdamW
    assert engine.basic_optimizer.defaults["fused"]
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    for _ in range(2):
        loss = engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    assert engine.global_steps == 1
    if zero != "zero3":  # ZeRO-3 partitions the module's parameters away
        after = [p.detach().float() for p in engine.module.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    # A GPU run's checkpoint (bf16 optimizer states included) loads under weights_only=True.
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag="t")
    safe_checkpoint_engine(engine)
    loaded, _ = engine.load_checkpoint(str(tmp_path / "ckpt"), tag="t")
    assert loaded is not None


def test_a_resume_loads_only_the_checkpoint_it_wrote(tmp_path, tiny_student, cache):
    """The checksums written with a checkpoint are checked before DeepSpeed unpickles anything:
    a damaged file, a file added later, or a `latest` naming another folder is one line."""
    out = tmp_path / "out"
    run(tmp_path, tiny_student, cache, out)
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text()
    sums = json.loads((ckpt / tag / "checksums.json").read_text())
    assert "run_state_rank0.json" in sums and any(name.endswith(".pt") for name in sums)
    more = dict(max_steps=3)  # a longer budget, so the rerun resumes rather than stops
    planted = ckpt / tag / "extra.pt"
    planted.write_bytes(b"pickle")
    with pytest.raises(PipelineError, match="holds extra.pt, written after it"):
        run(tmp_path, tiny_student, cache, out, **more)
    planted.unlink()
    state = next(ckpt.glob(f"{tag}/*model_states.pt"))
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(PipelineError, match="is damaged: .*model_states.pt differs"):
        run(tmp_path, tiny_student, cache, out, **more)
    (ckpt / "latest").write_text("../../elsewhere")
    with pytest.raises(PipelineError, match="not a checkpoint"):
        run(tmp_path, tiny_student, cache, out, **more)
    summary = run(tmp_path, tiny_student, cache, out, fresh=True, **more)
    assert summary["steps"] == "0 -> 3 (of 3)"


class _Planted:
    """Unpickling this would run code (here: create a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_resume_unpickles_nothing_but_tensors_and_plain_data(tmp_path, tiny_student, cache):
    """Someone who can write the output folder rewrites a checkpoint file *and* its checksum:
    the resume loads with weights_only=True, so the planted object is refused in one line, and
    its code never runs."""
    import torch

    from empathy_distill.shared.files import file_sha256

    out = tmp_path / "out"
    run(tmp_path, tiny_student, cache, out)
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text()
    state = next((ckpt / tag).glob("*model_states.pt"))
    marker = tmp_path / "code-ran"
    torch.save({"module": {}, "payload": _Planted(marker)}, state)
    sums = json.loads((ckpt / tag / "checksums.json").read_text())
    sums[state.name] = file_sha256(state)
    (ckpt / tag / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(PipelineError, match=r"holds getattr, which is neither .*weights_only=True"):
        run(tmp_path, tiny_student, cache, out, max_steps=3)
    assert not marker.exists()
