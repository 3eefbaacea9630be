"""Trainable state of each PET type: leaf tensors, how a step feeds them to the engine, export.

Banked types (LoRA, adapter, BitFit, IA3) train their tensors in Flock's layout directly; the
engine's ``slot_tensors`` turns them into the one-slot bank every step. Diff-pruning trains a
dense delta, then keeps the largest-magnitude entries (Guo et al. 2021, magnitude variant) and
re-trains the kept values through the engine's sparse op. MaskBERT (Zhao et al. 2020) trains
real-valued scores per weight; the mask is 1 where a score reaches the threshold, with a
straight-through gradient, and is exported as packed bits.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from schema.layout import LINEAR_SITES, BaseDims, expected_tensors, optional_tensors
from workers.engine.batch import TenantDelta
from workers.engine.pets.common import GROUPS, SITE_GROUP, layers_of
from workers.engine.pets.registry import PETS
from workers.trainer.forward import HEAD_ONLY, TENANT, TenantForward, base_tensors, with_weights

def _init(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Initial value of a layout tensor: the delta starts as the identity (no change to the base)."""
    if name.endswith("lora_A"):  # PEFT: kaiming-uniform A, zero B
        bound = 1.0 / math.sqrt(shape[1])
        return (torch.rand(shape, generator=g) * 2 - 1) * bound
    if name.endswith("down.weight"):  # adapters: small down-projection, zero up-projection
        return torch.randn(shape, generator=g) * 0.02
    if name.endswith("scale"):  # IA3: ones
        return torch.ones(shape)
    if name == "head.weight":
        return torch.randn(shape, generator=g) * 0.02
    return torch.zeros(shape)


class Head:
    def __init__(self, cfg: dict, dims: BaseDims, g: torch.Generator, device):
        # the head's tensors do not depend on the PET type: any type's layout lists them
        specs = [s for s in expected_tensors("bitfit", cfg, dims) if s.name.startswith("head.")]
        self.t = {s.name: _init(s.name, s.shape, g).to(device).requires_grad_() for s in specs}

    def params(self) -> list[torch.Tensor]:
        return list(self.t.values())


class Trainable:
    """Base: subclasses set self.t (leaf tensors) and implement step_inputs / export."""

    phases = ("train",)

    def __init__(self, pet_type: str, cfg: dict, fwd: TenantForward, g: torch.Generator, opts: dict):
        self.pet_type, self.cfg, self.fwd, self.dims, self.opts = pet_type, cfg, fwd, fwd.dims, opts
        self.t: dict[str, torch.Tensor] = {}

    def params(self) -> list[torch.Tensor]:
        return [p for p in self.t.values() if p.requires_grad]

    def param_groups(self, phase: str) -> dict[str, list[torch.Tensor]]:
        """The trainable tensors of a phase by role ("pet": the spec's lr; see core.ROLE_LR)."""
        return {"pet": self.params()}

    def probe(self, phase: str) -> float:
        """Fraction of a phase's first steps in which only the head trains."""
        return 0.0

    def auto_lr(self, lr_sum: float) -> float:
        """The delta's lr for a phase when neither the spec nor core.DEFAULT_LR gives one;
        ``lr_sum``: the phase's lr schedule summed over its steps (lr 1 => total movement)."""
        raise ValueError(f"{self.pet_type}: no default learning rate; give one")

    def logits(self, batch, head: Head) -> torch.Tensor:
        raise NotImplementedError

    def finish_phase(self, phase: str) -> None:
        """Called after a phase's epochs (diff-pruning prunes after "train")."""

    def export(self) -> dict[str, torch.Tensor]:
        return {n: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                for n, v in self.t.items()}

    def state(self) -> dict[str, torch.Tensor]:
        return {n: v.detach().clone() for n, v in self.t.items()}

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, v in st.items():
                self.t[n].copy_(v)


class Banked(Trainable):
    """LoRA, adapter, BitFit, IA3: layout tensors -> engine slot_tensors -> one-slot bank."""

    def __init__(self, pet_type, cfg, fwd, g, opts):
        super().__init__(pet_type, cfg, fwd, g, opts)
        specs = expected_tensors(pet_type, cfg, self.dims)
        if pet_type == "bitfit" and opts.get("ln", True):  # BitFit trains the LayerNorm biases too
            specs += [s for s in optional_tensors(pet_type, cfg, self.dims) if s.name.endswith("_ln.bias")]
        self.t = {s.name: _init(s.name, s.shape, g).requires_grad_()
                  for s in specs if not s.name.startswith("head.")}
        self.mod = PETS[pet_type].ops
        self.layout = self.mod.bank_layout(cfg, self.dims)

    def logits(self, batch, head: Head) -> torch.Tensor:
        t = {**self.t, **head.t}
        delta = TenantDelta(TENANT, 0, self.pet_type, self.cfg, t)
        bank = self.fwd.bank(self.layout)
        slots = self.mod.slot_tensors(delta, t, self.dims, self.layout)
        bank.tensors = {n: v.to(self.fwd.device).unsqueeze(0) for n, v in slots.items()}
        res = self.fwd.resident(self.pet_type, self.cfg, bank, self.fwd.head_bank(self.cfg, head.t), None)
        return self.fwd.logits(batch, res)


def _sites(cfg: dict) -> list[str]:
    return list(cfg.get("sites", LINEAR_SITES))


class _Reweighted(Trainable):
    """Shared by diff-pruning's dense phase and MaskBERT: each trained site's weight is a
    function of the frozen weight for the step (``site_weight``)."""

    def site_weight(self, i: int, s: str, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def stepped_base(self):
        base = self.fwd.base
        sites = set(_sites(self.cfg))
        layers = list(base.layers)
        for i in layers_of(self.cfg, self.dims):
            lw = layers[i]
            for grp in GROUPS:
                members = [s for s in ("q", "k", "v") if SITE_GROUP[s] == grp] if grp == "qkv" else [grp]
                if not sites & set(members):
                    continue
                ws, bs = [], []
                for s in members:
                    w, b = lw.site_weight(s)
                    if s in sites:
                        w, b = self.site_weight(i, s, w, b)
                    ws.append(w)
                    bs.append(b)
                lw = with_weights(lw, grp, torch.cat(ws) if len(ws) > 1 else ws[0],
                                  torch.cat(bs) if len(bs) > 1 else bs[0])
            layers[i] = lw
        return dataclasses.replace(base, layers=layers)


class Diff(_Reweighted):
    phases = ("train", "retrain")

    def __init__(self, pet_type, cfg, fwd, g, opts):
        super().__init__(pet_type, cfg, fwd, g, opts)
        dev = fwd.device
        self.phase = "train"
        for i in layers_of(cfg, self.dims):
            for s in _sites(cfg):
                o, n = self.dims.site_shape(s)
                self.t[f"layers.{i}.{s}.dense_delta"] = torch.zeros(o, n, device=dev, requires_grad=True)
                self.t[f"layers.{i}.{s}.bias"] = torch.zeros(o, device=dev, requires_grad=True)

    def site_weight(self, i, s, w, b):
        if self.phase == "train":
            dw = self.t[f"layers.{i}.{s}.dense_delta"]
        else:  # the kept entries scattered into W's shape: the engine's diff op's math, with autograd
            idx, val = self.t[f"layers.{i}.{s}.delta_index"], self.t[f"layers.{i}.{s}.delta_value"]
            dw = torch.zeros(w.numel(), device=w.device, dtype=w.dtype).index_add(0, idx, val).view_as(w)
        return w + dw, b + self.t[f"layers.{i}.{s}.bias"]

    def finish_phase(self, phase: str) -> None:
        if phase != "train":
            return
        density = float(self.opts.get("density", 0.005))
        t = {}
        with torch.no_grad():
            for i in layers_of(self.cfg, self.dims):
                for s in _sites(self.cfg):
                    d = self.t[f"layers.{i}.{s}.dense_delta"].reshape(-1)
                    k = max(1, min(d.numel() // 2, math.ceil(density * d.numel())))  # layout: <= half
                    idx = torch.topk(d.abs(), k).indices.sort().values
                    t[f"layers.{i}.{s}.delta_index"] = idx
                    t[f"layers.{i}.{s}.delta_value"] = d[idx].clone().requires_grad_()
                    t[f"layers.{i}.{s}.bias"] = self.t[f"layers.{i}.{s}.bias"].detach().clone().requires_grad_()
        self.t = t
        self.phase = "retrain"

    def params(self):
        return [v for v in self.t.values() if v.is_floating_point()]

    def param_groups(self, phase):
        if phase == "train":
            return {"pet": self.params()}
        # re-training: the kept entries go on at the delta's lr; the (dense) bias deltas and the
        # head, at BitFit's, recover what the dropped 1 - density of the delta carried
        return {"pet": [v for n, v in self.t.items() if n.endswith("delta_value")],
                "bias": [v for n, v in self.t.items() if n.endswith(".bias")]}

    def probe(self, phase):
        return float(self.opts.get("probe", 0.1)) if phase == "train" else 0.0

    def sparsity(self) -> float:
        """Fraction of the trained sites' weights the stored delta leaves unchanged (1 - density)."""
        tot = kept = 0
        for i in layers_of(self.cfg, self.dims):
            for s in _sites(self.cfg):
                o, n = self.dims.site_shape(s)
                tot += o * n
                kept += (self.t[f"layers.{i}.{s}.delta_index"].numel() if self.phase == "retrain"
                         else int((self.t[f"layers.{i}.{s}.dense_delta"] != 0).sum()))
        return 1.0 - kept / max(tot, 1)

    def logits(self, batch, head: Head) -> torch.Tensor:
        # Both phases vary the weight for the step (W + dW): on CUDA the engine's diff op can run
        # a Triton kernel, which autograd cannot see through (re-training there trained nothing).
        res = self.fwd.resident(HEAD_ONLY, self.cfg, None, self.fwd.head_bank(self.cfg, head.t), None)
        return self.fwd.logits(batch, res, self.stepped_base())

    def export(self):
        if self.phase == "train":
            self.finish_phase("train")
        return super().export()


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool [out, in] -> uint8 bytes, little bit order (bit k of byte j = element 8j + k)."""
    m = mask.reshape(-1).to(torch.uint8)
    pad = (-m.numel()) % 8
    if pad:
        m = torch.cat([m, m.new_zeros(pad)])
    shifts = torch.arange(8, device=m.device, dtype=torch.uint8)
    return (m.reshape(-1, 8) << shifts).sum(1).to(torch.uint8)


MASK_FLIP_RUN = 0.5  # MaskBERT: fraction of a run a score must be pushed one way to flip (auto_lr)


class MaskBert(_Reweighted):
    def __init__(self, pet_type, cfg, fwd, g, opts):
        super().__init__(pet_type, cfg, fwd, g, opts)
        self.tau = float(opts.get("threshold", 5e-3))
        init, p0 = 2 * self.tau, float(opts.get("init_sparsity", 0.0))
        self.margin = init - self.tau
        how = opts.get("score_init", "constant")
        if how not in ("constant", "magnitude"):
            raise ValueError(f"maskbert score_init {how!r}: one of constant, magnitude")
        for i in layers_of(cfg, self.dims):
            for s in _sites(cfg):
                o, n = self.dims.site_shape(s)
                if how == "magnitude":  # margin ~ |W| / mean |W|: a big weight needs more push to be cut
                    a = fwd.base.layers[i].site_weight(s)[0].detach().abs().float().cpu()
                    sc = self.tau + self.margin * (a / a.mean()).clamp(0.1, 10.0)
                else:
                    sc = torch.full((o, n), init)
                if p0 > 0:  # the paper starts from a few percent zeros
                    sc[torch.rand(o, n, generator=g) < p0] = 0.0
                self.t[f"layers.{i}.{s}.scores"] = sc.to(fwd.device).requires_grad_()

    def probe(self, phase):
        return float(self.opts.get("probe", 0.1))

    def auto_lr(self, lr_sum):
        # Adam moves each score ~lr a step whatever its gradient's size, so the lr sets how many
        # steps of one-way push flip a weight, and gradient noise flips weights too (a random walk
        # of ~lr * sqrt(steps)). A fixed lr suits one run length only: 5e-4 over 340 steps let noise
        # flip 17 % of MiniLM's weights. So the scores cross the margin (init - threshold) only when
        # pushed one way for MASK_FLIP_RUN of the (schedule-weighted) run, whatever its length.
        return self.margin / (MASK_FLIP_RUN * max(lr_sum, 1.0))

    def mask(self, i, s) -> torch.Tensor:
        return self.t[f"layers.{i}.{s}.scores"] >= self.tau

    def site_weight(self, i, s, w, b):
        sc = self.t[f"layers.{i}.{s}.scores"]
        m = (sc >= self.tau).to(sc.dtype)
        return w * (m + sc - sc.detach()), b  # forward: exactly W * M; backward: dL/dscores = dL/dM

    def logits(self, batch, head: Head) -> torch.Tensor:
        res = self.fwd.resident(HEAD_ONLY, self.cfg, None, self.fwd.head_bank(self.cfg, head.t), None)
        return self.fwd.logits(batch, res, self.stepped_base())

    def export(self):
        return {f"layers.{i}.{s}.mask_bits": pack_bits(self.mask(i, s)).cpu()
                for i in layers_of(self.cfg, self.dims) for s in _sites(self.cfg)}

    def sparsity(self) -> float:
        tot = kept = 0
        for i in layers_of(self.cfg, self.dims):
            for s in _sites(self.cfg):
                m = self.mask(i, s)
                tot += m.numel()
                kept += int(m.sum())
        return 1.0 - kept / max(tot, 1)


class Full(Trainable):
    """Full fine-tuning (the bench's baseline): every base tensor trains; nothing to register."""

    def __init__(self, pet_type, cfg, fwd, g, opts):
        super().__init__(pet_type, cfg, fwd, g, opts)
        for k, p in enumerate(base_tensors(fwd.base)):
            self.t[f"base.{k}"] = p.requires_grad_()

    def logits(self, batch, head: Head) -> torch.Tensor:
        res = self.fwd.resident(HEAD_ONLY, self.cfg, None, self.fwd.head_bank(self.cfg, head.t), None)
        return self.fwd.logits(batch, res)

    def export(self):
        return {}

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.t.values())


KINDS = {"lora": Banked, "adapter": Banked, "bitfit": Banked, "ia3": Banked, "diff": Diff,
         "maskbert": MaskBert, "full": Full}


def final_logits(tr: Trainable, batch, head: Head) -> torch.Tensor:
    """Evaluation through exactly what serving runs: the exported tensors, converted by the
    engine on the host as at load time (diff: index/value through the engine's diff op;
    MaskBERT: packed bits through its mask op)."""
    if isinstance(tr, (Diff, MaskBert)):
        t = {n: v.cpu() for n, v in tr.export().items()}
        delta = TenantDelta(TENANT, 0, tr.pet_type, tr.cfg, t)
        sparse = {n: v.to(tr.fwd.device) for n, v in PETS[tr.pet_type].ops.tenant_tensors(delta, t, tr.dims).items()}
        res = tr.fwd.resident(tr.pet_type, tr.cfg, None, tr.fwd.head_bank(tr.cfg, head.t), sparse)
        return tr.fwd.logits(batch, res)
    return tr.logits(batch, head)
