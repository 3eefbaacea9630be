"""Data types at the engine boundary: request items, packed batches, outputs, tenant deltas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from workers.engine.errors import BatchError, EngineError


@dataclass
class TenantDelta:
    """What the store's ``load_delta(tenant_id)`` returns: one tenant's PET delta + task head.

    ``tensors`` uses the names of workers.adapters.layout (``layers.{i}.{site}.{param}``, ``head.*``).
    """

    tenant_id: str
    version: int | str
    pet_type: str
    config: dict
    tensors: dict[str, torch.Tensor]


@dataclass
class RequestItem:
    """One request before tokenisation: text, text pair, or ready token ids."""

    tenant_id: str
    text: str | None = None
    text_pair: str | None = None
    token_ids: list[int] | None = None
    token_type_ids: list[int] | None = None
    request_id: Any = None


@dataclass
class PackedBatch:
    """Unpadded token stream of B sequences: sequence b is input_ids[cu_seqlens[b]:cu_seqlens[b+1]]."""

    input_ids: torch.Tensor  # int [T]
    cu_seqlens: torch.Tensor  # int [B+1], cu_seqlens[0] == 0
    tenant_ids: list[str]
    token_type_ids: torch.Tensor | None = None  # int [T]
    request_ids: list[Any] | None = None
    enqueued_at: float | None = None  # time.perf_counter() when the worker formed the batch

    def __post_init__(self):
        self.input_ids = torch.as_tensor(self.input_ids).reshape(-1)
        self.cu_seqlens = torch.as_tensor(self.cu_seqlens).reshape(-1)
        cu = self.cu_seqlens
        if cu.numel() != len(self.tenant_ids) + 1 or int(cu[0]) != 0 or int(cu[-1]) != self.input_ids.numel():
            raise BatchError("cu_seqlens must be [0, ..., T] with one entry per tenant_id plus one")
        if len(self.tenant_ids) == 0:
            raise BatchError("empty batch")
        if bool((cu[1:] - cu[:-1] <= 0).any()):
            raise BatchError("every sequence needs at least one token")
        if self.token_type_ids is not None:
            self.token_type_ids = torch.as_tensor(self.token_type_ids).reshape(-1)
            if self.token_type_ids.numel() != self.input_ids.numel():
                raise BatchError("token_type_ids length differs from input_ids")
        if self.request_ids is not None and len(self.request_ids) != len(self.tenant_ids):
            raise BatchError("request_ids length differs from tenant_ids")

    @property
    def num_seqs(self) -> int:
        return len(self.tenant_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()


@dataclass
class RequestOutput:
    """One sequence's answer. ``error`` set means no prediction (only this request failed)."""

    tenant_id: str
    request_id: Any = None
    adapter_version: int | str | None = None
    task: str | None = None
    label: str | None = None  # seq_cls: argmax label
    scores: list[float] | None = None  # seq_cls: softmax over the tenant's labels
    labels: list[str] | None = None  # the tenant's label names, in the order of scores
    logits: list[float] | None = None
    token_labels: list[str] | None = None  # token_cls: argmax per token
    token_scores: list[list[float]] | None = None  # token_cls: softmax per token
    timings: dict[str, float] = field(default_factory=dict)
    error: EngineError | None = None
