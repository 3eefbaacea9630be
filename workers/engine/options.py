"""The engine's kernel options (fixed for an Engine's life) and the choices it tunes at run time.

Options come from ``Settings`` (``FLOCK_LORA_INTO_GEMM``, ``FLOCK_LORA_FUSED``,
``FLOCK_VARLEN_ATTN``, ``FLOCK_LORA_GEMM``) through ``EngineOptions.from_settings``; the engine imports no config.
Auto-tuned choices live on the Encoder instance (``Tuned``), so two engines in one process (tests,
bench) never share or overwrite each other's; ``Engine.tuned_choices()`` reports them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class EngineOptions:
    # LoRA on the fast path: the expand writes bias + delta into the GEMM's output buffer and the
    # base GEMM accumulates into it (beta = 1). Measured on H200 (BERT-base, 10k LoRA r8): +100 us
    # per QKV call, as much as the read-modify-write it saves, so off by default.
    lora_into_gemm: bool = False
    # Triton LoRA: "auto" times the fused shrink+expand kernel against the separate shrink / expand
    # once per shape and keeps the faster; "1" always fused, "0" always separate. Under
    # TRITON_INTERPRET=1 "auto" means fused.
    lora_fused: str = "auto"
    # Unequal lengths on CUDA (bf16/fp16): "triton" = packed-window kernel, "flash" = torch's flash
    # varlen, "auto" = time both on the first varlen batch and keep the faster.
    varlen_attn: str = "auto"
    # LoRA delta in the epilogue of a Triton GEMM that replaces cuBLAS for that site group (no
    # read-modify-write of q|v): "auto" times it against cuBLAS + the LoRA pass once per shape and
    # keeps the faster; "1" always, "0" never. Under TRITON_INTERPRET=1 "auto" means on. Off by
    # default: on the H200 the Triton GEMM loses to cuBLAS by more than the pass it saves, and
    # "auto" would compile and time its launch configs on a worker's first batch for nothing.
    lora_gemm: str = "0"

    def __post_init__(self):
        for name in ("lora_fused", "lora_gemm"):
            if getattr(self, name) not in ("auto", "0", "1"):
                raise ValueError(f"{name} must be auto, 0 or 1, not {getattr(self, name)!r}")
        if self.varlen_attn not in ("auto", "triton", "flash"):
            raise ValueError(f"varlen_attn must be auto, triton or flash, not {self.varlen_attn!r}")

    @classmethod
    def from_settings(cls, s) -> "EngineOptions":
        """From a ``workers.config.Settings`` (duck-typed: the engine does not import config)."""
        return cls(lora_into_gemm=s.lora_into_gemm, lora_fused=s.lora_fused, varlen_attn=s.varlen_attn,
                   lora_gemm=s.lora_gemm)


@dataclass
class Tuned:
    """What the engine decided at run time (first batch of a shape)."""

    lora_fused: dict = field(default_factory=dict)  # shape key -> True (fused) / False (separate)
    lora_fused_us: dict = field(default_factory=dict)  # str(shape key) -> {"fused": us, "separate": us}
    varlen: str | None = None  # "triton" | "flash" once timed
    varlen_ms: dict = field(default_factory=dict)  # ms per call of each varlen kernel (and errors)
    flash_mode: str | None = None  # which flash varlen call works here ("padded": none does)
    lora_gemm: dict = field(default_factory=dict)  # (site group, shape...) -> Triton GEMM with the delta?
    lora_gemm_us: dict = field(default_factory=dict)  # str(key) -> {"epilogue": us, "cublas+pass": us}
    sparse_kernel: dict = field(default_factory=dict)  # (pet, site group, shape...) -> batched kernel?
    sparse_kernel_us: dict = field(default_factory=dict)  # str(key) -> {"kernel": us, "per_tenant": us}

    def report(self) -> dict:
        """JSON-able summary for the startup log and /metrics."""
        d = asdict(self)
        d["lora_fused"] = {str(k): v for k, v in self.lora_fused.items()}
        d["sparse_kernel"] = {str(k): v for k, v in self.sparse_kernel.items()}
        d["lora_gemm"] = {str(k): v for k, v in self.lora_gemm.items()}
        return d
