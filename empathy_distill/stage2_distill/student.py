"""The student during training: a Hugging Face causal LM plus PRIDE's multi-source attention.

    student = Student(AutoModelForCausalLM.from_pretrained(folder), sources=["situation"],
                           layer=None, feature_dim=576)
    out = student(input_ids, attention_mask, pred_rows, pred_cols, privileged={...})
    export_student(engine, tokenizer, folder / "final")  # the plain base model, no extra modules

Multi-source attention (PRIDE's): after one middle decoder layer, each privileged source
(situation, future, expert notes, ...) gets its own cross-attention whose queries are the
student's hidden states and whose keys/values are that source's text encoded by the student's
own embeddings and layers up to the same layer. The sources are fused as
h + sum_s tanh(gate_s) * attn_s(h, source_s), gates starting at zero so training starts from
the unmodified student. The privileged text is encoded without gradients: it is training-only
input, the exported weights should not specialise to encode it, and it keeps the extra cost of
`pride` over `sft` to one forward pass over short texts (the cross-attentions' own key/value
projections learn what to take from it). With no privileged input the hook adds nothing at all,
so the base model alone is the exported student, and its outputs equal the trained model's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from empathy_distill.shared.models import Tokenizer


class MultiSourceAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, sources: list[str]) -> None:
        super().__init__()
        self.sources = list(sources)
        self.attn = nn.ModuleDict(
            {s: nn.MultiheadAttention(hidden, heads, batch_first=True) for s in self.sources}
        )
        self.gates = nn.ParameterDict({s: nn.Parameter(torch.zeros(1)) for s in self.sources})

    def forward(self, hidden: Tensor, memory: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """`memory`: source -> (encoded text [B, S, H], mask [B, S]) for every source; a row
        whose mask is all zero (source absent or dropped) gets exactly nothing from that source.
        Every source's attention runs every step, whatever the batch holds: under ZeRO the ranks
        must run the same modules."""
        out = hidden
        for name in self.sources:
            keys, mask = memory[name]
            present = mask.bool().any(dim=1)  # [B]
            # A fully masked row would make softmax NaN; let it attend anywhere, then zero it.
            padding = ~(mask.bool() | ~present[:, None])
            attended, _ = self.attn[name](
                hidden,
                keys.to(hidden.dtype),
                keys.to(hidden.dtype),
                key_padding_mask=padding,
                need_weights=False,
            )
            attended = torch.where(present[:, None, None], attended, torch.zeros_like(attended))
            out = out + torch.tanh(self.gates[name]).to(hidden.dtype) * attended
        return out


class Student(nn.Module):
    """Every method's student: the base causal LM, optionally with PRIDE's multi-source attention
    over privileged inputs and an MMD feature projection.

    `sources=[]` gives a plain student (sft, seqkd, kd, pride-no-pi, and sft-dpo's frozen DPO
    reference); `feature_dim=None` no MMD."""

    def __init__(
        self,
        base: nn.Module,
        *,
        sources: list[str],
        layer: int | None = None,
        feature_dim: int | None = None,
        privileged_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base = base
        cfg = base.config
        n_layers = cfg.num_hidden_layers
        self.layer = n_layers // 2 if layer is None else layer
        if not 0 <= self.layer < n_layers:
            raise ValueError(f"attention_layer {self.layer} is not one of {n_layers} layers")
        self.privileged_dropout = privileged_dropout
        heads = cfg.num_attention_heads
        self.msa = MultiSourceAttention(cfg.hidden_size, heads, sources) if sources else None
        self.proj = nn.Linear(cfg.hidden_size, feature_dim) if feature_dim else None
        self._memory: dict[str, tuple[Tensor, Tensor]] | None = None
        if self.msa is not None:
            base.model.layers[self.layer].register_forward_hook(self._inject)

    def _inject(self, module: nn.Module, args, output):
        if not self._memory:
            return None  # no privileged input: the layer's output is left untouched
        hidden = output[0] if isinstance(output, tuple) else output
        mixed = self.msa(hidden, self._memory)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    @torch.no_grad()
    def encode_privileged(self, privileged: dict[str, tuple[Tensor, Tensor]]) -> dict:
        """All sources in one batched pass of the base model; states after `self.layer`."""
        names = list(privileged)
        width = max(ids.shape[1] for ids, _ in privileged.values())

        def padded(i: int) -> Tensor:
            return torch.cat([F.pad(t[i], (0, width - t[i].shape[1])) for t in privileged.values()])

        ids, mask = padded(0), padded(1)
        # Rows without this source have an all-zero mask; give them one visible token so the
        # encoder stays finite (their output is discarded by the attention anyway).
        safe = mask.clone()
        safe[:, 0] = 1
        # Only the layers up to `self.layer` matter: Hugging Face decoders run
        # `layers[: config.num_hidden_layers]`, so lowering it for this pass skips the rest (a
        # model that ignores it runs them all: slower, same result, the states come from a hook).
        captured = []
        handle = self.base.model.layers[self.layer].register_forward_hook(
            lambda module, args, output: captured.append(output)
        )
        config, n_layers = self.base.model.config, self.base.model.config.num_hidden_layers
        config.num_hidden_layers = self.layer + 1
        try:
            self.base.model(input_ids=ids, attention_mask=safe)
        finally:
            config.num_hidden_layers = n_layers
            handle.remove()
        states = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
        encoded = states.chunk(len(names))
        masks = mask.chunk(len(names))
        return {n: (encoded[i], masks[i]) for i, n in enumerate(names)}

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pred_rows: Tensor,
        pred_cols: Tensor,
        feat_rows: Tensor | None = None,
        feat_cols: Tensor | None = None,
        feat_index: Tensor | None = None,
        privileged: dict[str, tuple[Tensor, Tensor]] | None = None,
    ) -> dict[str, Tensor | None]:
        """Logits at the predicted positions [N, V] and the pooled, projected reply features
        [R, feature_dim] (R = rows with teacher features), or None without a projection."""
        memory = None
        if self.msa is not None and privileged:
            # A source not given is absent from every row: one fully masked position, so the
            # same modules run whichever sources a batch holds.
            absent = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
            privileged = {s: privileged.get(s, (absent, absent)) for s in self.msa.sources}
            memory = self.encode_privileged(privileged)
            if self.training and self.privileged_dropout > 0:
                # Drop each source per row: the student must not come to rely on privileged text
                # it will never see at run time.
                kept = {
                    n: torch.rand(m.shape[0], 1, device=m.device) >= self.privileged_dropout
                    for n, (_, m) in memory.items()
                }
                memory = {n: (keys, mask * kept[n]) for n, (keys, mask) in memory.items()}
        self._memory = memory
        try:
            hidden = self.base.model(input_ids=input_ids, attention_mask=attention_mask)
            hidden = hidden.last_hidden_state  # final norm applied, as the teacher's features
        finally:
            self._memory = None
        logits = self.base.lm_head(hidden[pred_rows, pred_cols])
        features = None
        if self.proj is not None and feat_index is not None:
            # Per-token L2 normalisation, then the mean over each row's reply: the teacher's
            # definition (shared/schema.py), then a learned map to the teacher's width. Run
            # with no rows too (an empty result): every rank uses the projection every step.
            tokens = F.normalize(hidden[feat_rows, feat_cols].float(), dim=-1)
            n_rows = int(feat_index.max()) + 1 if feat_index.numel() else 0
            sums = torch.zeros(n_rows, tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
            sums = sums.index_add(0, feat_index, tokens)
            counts = torch.bincount(feat_index, minlength=n_rows).clamp_min(1)
            pooled = sums / counts[:, None].to(tokens.dtype)
            features = self.proj(pooled.to(self.proj.weight.dtype))
        return {"logits": logits, "features": features}


def export_student(engine: DeepSpeedEngine, tokenizer: Tokenizer, folder: Path, rank: int) -> None:
    """Save the base model (no multi-source attention, no projection) and the tokenizer as a plain
    Hugging Face folder. Under ZeRO-3 the partitioned weights are gathered first (every rank must
    call this); rank 0 writes."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        full = engine._zero3_consolidated_16bit_state_dict()
        state = {k[len("base.") :]: v for k, v in (full or {}).items() if k.startswith("base.")}
    else:
        state = {k: v.detach() for k, v in module.base.state_dict().items()}
    if rank != 0:
        return
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.base.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # a reader never sees a half-written final/
