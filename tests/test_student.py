"""The multi-source attention student: no privileged input means no change, and the export is the
plain base model with the same logits, loadable by transformers."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from empathy_distill.stage2_distill.student import Student, export_student


class _Engine:
    """Just what export_student asks of a DeepSpeed engine (ZeRO stages 0-2)."""

    def __init__(self, module):
        self.module = module

    def zero_optimization_stage(self) -> int:
        return 2


def _student(folder) -> Student:
    torch.manual_seed(0)
    model = Student(
        AutoModelForCausalLM.from_pretrained(folder),
        sources=["situation", "future"],
        feature_dim=8,
    ).eval()
    with torch.no_grad():  # open the gates, so the module would show if it were used
        for gate in model.msa.gates.values():
            gate.fill_(1.5)
    return model


def _inputs():
    ids = torch.randint(100, 5000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def test_no_privileged_input_changes_nothing_and_export_matches(tmp_path, tiny_student):
    model = _student(tiny_student)
    plain = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    ids, mask = _inputs()
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([3, 4, 8])
    with torch.no_grad():
        # every position, no privileged input: what the exported model computes
        wrapped = model.base(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(wrapped, plain(input_ids=ids, attention_mask=mask).logits)
        picked = model(ids, mask, rows, cols)["logits"]
        assert torch.allclose(picked, wrapped[rows, cols], atol=1e-6)  # same values, other matmul
        priv = {"situation": (torch.randint(100, 5000, (2, 5)), torch.tensor([[1] * 5, [0] * 5]))}
        with_pi = model(ids, mask, rows, cols, privileged=priv)["logits"]
        assert not torch.allclose(with_pi[:2], picked[:2])  # row 0 has the source: it is used
        assert torch.equal(with_pi[2], picked[2])  # row 1 has none: exactly nothing added

    export_student(_Engine(model), _tokenizer(tiny_student), tmp_path / "final", rank=0)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert set(exported.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids, attention_mask=mask).logits, wrapped)


def test_gates_start_at_zero_and_features_are_pooled(tiny_student):
    torch.manual_seed(0)
    model = Student(
        AutoModelForCausalLM.from_pretrained(tiny_student), sources=["situation"], feature_dim=8
    )
    assert all(float(g.detach()) == 0.0 for g in model.msa.gates.values())
    ids, mask = _inputs()
    priv = {"situation": (torch.randint(100, 5000, (2, 5)), torch.ones(2, 5, dtype=torch.long))}
    out = model(
        ids,
        mask,
        torch.tensor([0, 1]),
        torch.tensor([5, 5]),
        feat_rows=torch.tensor([0, 0, 1]),
        feat_cols=torch.tensor([6, 7, 6]),
        feat_index=torch.tensor([0, 0, 1]),
        privileged=priv,
    )
    assert out["features"].shape == (2, 8)
    out["logits"].sum().backward()
    assert model.msa.gates["situation"].grad is not None  # the gate learns first


def _tokenizer(folder):
    from empathy_distill.shared.models import load_tokenizer

    return load_tokenizer(folder)
