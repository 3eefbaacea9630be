"""The engine's forward with autograd, for one tenant: what training and its evaluation run.

Nothing here re-implements a PET: a step builds a one-slot bank (or the sparse payload) from the
trainable tensors with the engine's own converters (``slot_tensors`` / ``diff_tensors`` /
``mask_tensors``), plans the batch with ``build_plan`` and runs ``Encoder.forward`` and the
engine's heads. The converters only index, scale and copy, so gradients reach the leaf tensors.
Two training phases need the weight itself to vary (diff-pruning before pruning: W + dW;
MaskBERT: W * mask with a straight-through mask; full fine-tuning): those run the same forward
with the base's weights replaced for the step (``with_weights``), which is the same math as
the engine's sparse ops (W + dW, W * M); their final evaluation runs the engine's sparse ops.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from workers.engine import heads
from workers.engine.bank import SlotBank
from workers.engine.batch import TenantDelta
from workers.engine.encoder import Encoder
from workers.engine.model_loading import BaseWeights, LayerWeights
from workers.engine.plan import build_plan
from workers.engine.pool import Resident

TENANT = "trainee"
# A diff-pruning tenant with no entries changes no weight: the engine runs base + head only
# (used while the weights themselves vary: see with_weights).
HEAD_ONLY = "diff"


def _field_names(obj, tensors) -> list[str]:
    """Dataclass field names holding exactly these tensor objects (robust to field renames)."""
    ids = [id(t) for t in tensors]
    by_id = {id(getattr(obj, f.name)): f.name for f in dataclasses.fields(obj)}
    return [by_id[i] for i in ids]


def with_weights(lw: LayerWeights, group: str, w: torch.Tensor, b: torch.Tensor) -> LayerWeights:
    """A copy of one layer's weights with a shared GEMM group's (weight, bias) replaced."""
    wn, bn = _field_names(lw, lw.params(group))
    return dataclasses.replace(lw, **{wn: w, bn: b})


def base_tensors(base: BaseWeights) -> list[torch.Tensor]:
    """Every tensor of a base model (full fine-tuning trains them all)."""
    out = [getattr(base, f.name) for f in dataclasses.fields(base)]
    out = [t for t in out if isinstance(t, torch.Tensor)]
    for lw in base.layers:
        out += [getattr(lw, f.name) for f in dataclasses.fields(lw)]
    return out


class Batch:
    """Token ids of some rows, packed the way the engine takes them."""

    def __init__(self, ids: list[list[int]], tts: list[list[int]] | None):
        lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        self.cu = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lens, out=self.cu[1:])
        self.input_ids = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(self.cu[-1]))
        self.token_type_ids = (np.fromiter((t for x in tts for t in x), dtype=np.int64, count=int(self.cu[-1]))
                               if tts is not None else None)
        self.n = len(ids)


class TenantForward:
    """Runs the engine's encoder + heads for one tenant on the trainer's device, grad-enabled."""

    def __init__(self, base: BaseWeights, device: torch.device):
        self.device = device
        self.encoder = Encoder(base, device, torch.float32)
        self.base = self.encoder.base  # the frozen base on the device
        self.dims = base.dims
        self._banks: dict[str, SlotBank] = {}
        self._empty: dict | None = None
        # Zero that requires grad, added to the embedding LayerNorm's bias while training: every
        # activation is then part of the graph, so the engine's in-place PET adds never land on a
        # graph leaf (autograd refuses in-place writes into views of leaves).
        self._anchor = torch.zeros((), device=device, requires_grad=True)

    def bank(self, layout) -> SlotBank:
        """A one-slot bank of this layout; its tensors are replaced at every step."""
        b = self._banks.get(layout.key)
        if b is None:
            b = self._banks[layout.key] = SlotBank(layout, 1, self.device, torch.float32)
        return b

    def resident(self, pet_type: str, cfg: dict, bank: SlotBank | None, head_bank: SlotBank,
                 sparse: dict | None) -> Resident:
        if pet_type == HEAD_ONLY and sparse is None:
            sparse = self._no_change()
        task = cfg["task"]
        pooling = cfg.get("pooling", "cls") if task == "seq_cls" else "cls"
        return Resident(TENANT, 0, pet_type, task, pooling, list(cfg["labels"]), bank, 0, head_bank, 0,
                        sparse, 0, 0)

    def _no_change(self) -> dict:
        """The engine's own payload of a diff-pruning delta with no entries (cached)."""
        if self._empty is None:
            from workers.engine.pets.registry import PETS
            cfg = {"task": "seq_cls", "labels": ["a", "b"], "layers": [0], "sites": ["q"]}
            t = {"layers.0.q.delta_index": torch.zeros(0, dtype=torch.long),
                 "layers.0.q.delta_value": torch.zeros(0)}
            tt = PETS[HEAD_ONLY].ops.tenant_tensors(TenantDelta(TENANT, 0, HEAD_ONLY, cfg, t), t, self.dims)
            self._empty = {n: v.to(self.device) for n, v in tt.items()}
        return self._empty

    def head_bank(self, cfg: dict, t: dict[str, torch.Tensor]) -> SlotBank:
        layout = heads.bank_layout(cfg, self.dims)
        bank = self.bank(layout)
        delta = TenantDelta(TENANT, 0, "head", cfg, t)
        bank.tensors = {n: v.to(self.device).unsqueeze(0) for n, v in heads.slot_tensors(delta, t, self.dims, layout).items()}
        return bank

    def logits(self, batch: Batch, res: Resident, base: BaseWeights | None = None) -> torch.Tensor:
        """seq_cls: [n, C] in batch row order; token_cls: [tokens, C] row after row, in order."""
        plan = build_plan(batch.input_ids, batch.token_type_ids, batch.cu, [res],
                          self.base.position_offset, self.device, False,
                          tenant_index=np.zeros(batch.n, dtype=np.int64))
        base = base if base is not None else self.base
        if torch.is_grad_enabled():
            base = dataclasses.replace(base, emb_ln_b=base.emb_ln_b + self._anchor)
        self.encoder.base = base
        try:
            hidden = self.encoder.forward(plan)
            b = self.encoder.base
            hg = plan.heads[0]
            C = res.n_labels
            if res.task == "seq_cls":
                pooled = heads.pool_hidden(hidden, plan, b.pooler_w, b.pooler_b)
                lg, _ = heads.seq_logits(hg, pooled)
                rows = plan.order[np.asarray(hg.seq_order, dtype=np.int64)]  # batch row of each logit row
                back = torch.from_numpy(np.argsort(rows)).to(self.device)
                return lg[:, :C].index_select(0, back)
            lg, _ = heads.token_logits(hg, hidden)
            # token logits come sequence after sequence in hg.tok_order (sorted positions)
            rows = plan.order[np.asarray(hg.tok_order, dtype=np.int64)]
            lens = np.diff(batch.cu)[rows]
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            order = np.argsort(rows)
            idx = np.concatenate([np.arange(starts[k], starts[k] + lens[k]) for k in order])
            return lg[:, :C].index_select(0, torch.from_numpy(idx).to(self.device))
        finally:
            self.encoder.base = self.base
