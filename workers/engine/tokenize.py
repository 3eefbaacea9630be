"""Tokenisation helper: (tenant, text | text pair | token ids) items -> PackedBatch."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from workers.engine.batch import PackedBatch, RequestItem
from workers.engine.errors import BatchError


class BatchTokenizer:
    def __init__(self, model_dir: str, max_length: int = 512):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
        if not self.tok.is_fast:
            raise BatchError("a fast (Rust) tokenizer is required")
        self.max_length = max_length

    def pack(self, items: Sequence[RequestItem]) -> PackedBatch:
        ids: list[list[int] | None] = [None] * len(items)
        tts: list[list[int] | None] = [None] * len(items)
        for pair in (False, True):  # one batched tokenizer call per kind
            idx = [i for i, it in enumerate(items) if it.token_ids is None and (it.text_pair is not None) == pair]
            if not idx:
                continue
            texts = [items[i].text for i in idx]
            if any(t is None for t in texts):
                raise BatchError("an item needs text or token_ids")
            enc = self.tok(texts, [items[i].text_pair for i in idx] if pair else None, truncation=True,
                           max_length=self.max_length, return_attention_mask=False)
            for j, i in enumerate(idx):
                ids[i] = enc["input_ids"][j]
                tts[i] = enc["token_type_ids"][j] if "token_type_ids" in enc else None
        for i, it in enumerate(items):
            if it.token_ids is not None:
                if not it.token_ids:
                    raise BatchError("empty token_ids")
                ids[i] = list(it.token_ids[:self.max_length])
                tts[i] = list(it.token_type_ids[:self.max_length]) if it.token_type_ids else [0] * len(ids[i])
        lens = [len(x) for x in ids]
        cu = torch.zeros(len(items) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(lens).cumsum(0)
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.int64)
        tt = None
        if any(t is not None for t in tts):
            tt = torch.tensor([v for i, x in enumerate(tts) for v in (x if x is not None else [0] * lens[i])],
                              dtype=torch.int64)
        return PackedBatch(flat, cu, [it.tenant_id for it in items], tt,
                           [it.request_id for it in items], enqueued_at=time.perf_counter())
