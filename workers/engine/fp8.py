"""FP8 base (issue 14): the encoder's four shared GEMMs per layer in float8 e4m3.

Opt-in per base model: ``flockserve base build-fp8 BASE --corpus FILES`` derives a base
(``BASE-fp8``) whose config.json carries ``flock_fp8`` and whose ``fp8_scales.safetensors`` holds
each GEMM input's absolute maximum over an unlabelled calibration corpus (run in fp32 through the
plain base). At load the engine quantises each shared weight with one per-tensor scale and every
GEMM input with its static calibrated scale; tenants' deltas (LoRA, adapters, BitFit, IA3, diff,
MaskBERT) stay in the serving dtype and read the unquantised activations.

Static scales are what make FP8 pay: the GEMM input leaves the kernel that produces it already in
e4m3 (the fused add+LayerNorm writes both the bf16 residual and the e4m3 copy; FFN-in's GELU and
the attention output go through one quantising pass), never through separate amax/divide/cast ops.

On CUDA (compute capability >= 8.9) the GEMM is ``torch._scaled_mm`` (cuBLASLt, fp32 accumulate,
bias and output in the serving dtype). Elsewhere (CPU, tests) the same numbers are emulated: the
e4m3 values dequantised, multiplied in the serving dtype. Tolerance: the FP8 base is not exact;
docs/engine.md states what it was measured to cost in accuracy.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from workers.engine.pets.common import GROUPS

FP8_KEY = "flock_fp8"  # config.json key of an FP8 base
FP8_FILE = "fp8_scales.safetensors"
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def fp8_amax(model_dir: str) -> torch.Tensor | None:
    """[layers, len(GROUPS)] calibrated GEMM-input amax of an FP8 base; None for another base."""
    with open(os.path.join(model_dir, "config.json")) as f:
        if FP8_KEY not in json.load(f):
            return None
    return load_file(os.path.join(model_dir, FP8_FILE))["act_amax"].float()


def quantize_ref(x: torch.Tensor, inv_scale: float) -> torch.Tensor:
    """x / scale saturated to e4m3 (round to nearest even): the torch path and the reference."""
    return (x.float() * inv_scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)


def native_fp8(device: torch.device) -> bool:
    """cuBLASLt FP8 GEMMs: Ada / Hopper and later."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


class Fp8Gemms:
    """The quantised shared weights and static input scales of one encoder (weights from
    ``base.layers``, already on their device). ``linear`` is the only GEMM entry point."""

    def __init__(self, base, act_amax: torch.Tensor, device: torch.device, dtype: torch.dtype,
                 use_kernels: bool):
        layers = base.layers
        if tuple(act_amax.shape) != (len(layers), len(GROUPS)):
            raise ValueError(f"fp8 scales of shape {tuple(act_amax.shape)}, want ({len(layers)}, {len(GROUPS)})")
        self.device, self.dtype = torch.device(device), dtype
        self.native = native_fp8(self.device)
        self.use_kernels = use_kernels  # Triton quantising passes (CUDA or the interpreter)
        self.w, self.w_scale, self.x_scale, self.inv_x = {}, {}, {}, {}
        for i, lw in enumerate(layers):
            for j, g in enumerate(GROUPS):
                w = lw.params(g)[0]
                sw = max(float(w.abs().max()), 1e-12) / E4M3_MAX
                wq = quantize_ref(w, 1.0 / sw)
                # CPU: keep the dequantised weight (emulation multiplies in the serving dtype)
                self.w[i, g] = wq if self.native else (wq.float() * sw).to(dtype)
                sx = max(float(act_amax[i, j]), 1e-6) / E4M3_MAX
                self.w_scale[i, g] = torch.tensor(sw, dtype=torch.float32, device=self.device)
                self.x_scale[i, g] = torch.tensor(sx, dtype=torch.float32, device=self.device)
                self.inv_x[i, g] = 1.0 / sx

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.w.values())

    def quantize(self, i: int, group: str, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """The e4m3 input of GEMM (i, group); ``gelu``: of GELU(x) (tanh form, FFN-out's input)."""
        if self.use_kernels:
            from workers.engine.kernels.triton_fp8 import quantize
            return quantize(x, self.inv_x[i, group], gelu)
        if gelu:
            x = torch.nn.functional.gelu(x.float(), approximate="tanh")
        return quantize_ref(x, self.inv_x[i, group])

    def linear(self, i: int, group: str, xq: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """xq [T, in] e4m3 -> x Wᵀ + b [T, out] in the serving dtype."""
        if self.native:
            return torch._scaled_mm(xq, self.w[i, group].t(), scale_a=self.x_scale[i, group],
                                    scale_b=self.w_scale[i, group], bias=b, out_dtype=self.dtype)
        x = xq.to(self.dtype) * self.x_scale[i, group].to(self.dtype)
        return torch.addmm(b, x, self.w[i, group].t())


def calibrate(encoder, batches, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """[layers, len(GROUPS)] amax of each shared GEMM's input over ``batches`` (plans of the plain
    base, no tenants), read through the encoder's ``observe`` hook."""
    amax = torch.zeros(len(encoder.base.layers), len(GROUPS))

    def observe(i: int, group: str, x: torch.Tensor) -> None:
        j = GROUPS.index(group)
        amax[i, j] = max(float(amax[i, j]), float(x.detach().abs().max()))
    encoder.observe = observe
    try:
        with torch.inference_mode():
            for n, plan in enumerate(batches, 1):
                encoder.forward(plan)
                if progress:
                    progress(n)
    finally:
        encoder.observe = None
    return amax


def save_scales(out_dir: str, act_amax: torch.Tensor, meta: dict) -> None:
    save_file({"act_amax": act_amax.float().contiguous()}, os.path.join(out_dir, FP8_FILE),
              metadata={FP8_KEY: json.dumps(meta)})


def calibration_plans(model_dir: str, texts: Sequence[str], max_length: int, batch_size: int,
                      device: torch.device, position_offset: int = 0):
    """Base-only plans of the corpus texts, batch_size texts each (a generator)."""
    from workers.engine.batch import RequestItem
    from workers.engine.plan import build_plan
    from workers.engine.tokenize import BatchTokenizer
    tok = BatchTokenizer(model_dir, max_length)
    for k in range(0, len(texts), batch_size):
        b = tok.pack([RequestItem("-", text=t) for t in texts[k:k + batch_size]])
        yield build_plan(b.input_ids, b.token_type_ids, b.cu_seqlens, [None] * b.num_seqs, position_offset,
                         device, False)


def build_fp8_base(base_id: str, base_dir: str, out, corpus: Sequence[str], max_texts: int = 4096,
                   max_length: int = 128, batch_size: int = 64, device: str = "cpu",
                   progress: Callable[[str, int, int, dict], None] | None = None) -> dict:
    """Calibrate the GEMM inputs' amax on (up to ``max_texts`` of) the corpus in fp32 and write
    the FP8 base directory ``out``; returns a summary."""
    from pathlib import Path

    from workers.engine.derived import read_corpus, write_derived_base
    from workers.engine.encoder import Encoder
    from workers.engine.model_loading import load_base
    texts = read_corpus(corpus)[:max_texts]
    base = load_base(base_dir)
    dev = torch.device(device)
    enc = Encoder(base, dev, torch.float32)
    total = -(-len(texts) // batch_size)
    plans = calibration_plans(base_dir, texts, max_length, batch_size, dev, base.position_offset)
    amax = calibrate(enc, plans, (lambda n: progress("calibrate", n, total, {})) if progress else None)
    meta = {"base": base_id, "format": "e4m3", "weights": "per-tensor scale", "activations":
            "static per-tensor scale (calibrated amax)", "corpus": [str(c) for c in corpus], "texts": len(texts),
            "max_length": max_length}
    out = Path(out)
    write_derived_base(base_dir, out, FP8_KEY, meta)
    save_scales(str(out), amax, meta)
    return {"out": str(out), **meta, "amax_max": round(float(amax.max()), 4), "amax_min": round(float(amax.min()), 4)}
