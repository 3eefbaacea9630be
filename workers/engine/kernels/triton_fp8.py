"""The FP8 base's quantising pass (Triton): one read of a bf16 GEMM input, one e4m3 write.

``quantize``: q = saturate(x * inv_scale) in e4m3 (round to nearest even), optionally of
GELU(x) (tanh form) so FFN-in's output goes straight to FFN-out's e4m3 input without a bf16 copy.
The add+LayerNorm kernel (``triton_norm.add_layer_norm(..., q_inv_scale=)``) writes the e4m3 copy
of its output itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.engine.kernels import interpret

BLOCK = 2048


@triton.jit
def _quant_kernel(x_ptr, q_ptr, n, inv, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if GELU:  # tanh form, as the cuBLASLt epilogue of the bf16 path
        c = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * c) - 1.0))
    q = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=m)


def quantize(x: torch.Tensor, inv_scale: float, gelu: bool = False) -> torch.Tensor:
    """e4m3 copy of x (contiguous) / scale; of GELU(x) with ``gelu``."""
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n = x.numel()
    if n:
        block = 256 if interpret() else BLOCK
        _quant_kernel[(triton.cdiv(n, block),)](x, q, n, inv_scale, GELU=gelu, BLOCK=block, num_warps=8)
    return q
