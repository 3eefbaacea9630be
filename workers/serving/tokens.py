"""Tokenisation at intake (batched, fast tokenizer) and packing of tokenised work for the engine."""

from __future__ import annotations

from typing import Any

from schema.messages import InferRequest
from workers.engine.batch import RequestItem
from workers.engine.tokenize import BatchTokenizer


class IntakeTokenizer:
    def __init__(self, model_dir: str, truncate: bool):
        self.bt = BatchTokenizer(str(model_dir))
        self.truncate = truncate
        self.vocab_size = len(self.bt.tok)

    def ids(self, reqs: list[InferRequest], max_len: int) -> list[tuple[list[int], list[int] | None]]:
        """Token ids per request. Without truncation, one token more than allowed is kept so that
        the caller can tell an oversize input from one that fits exactly."""
        limit = max_len if self.truncate else max_len + 1
        out: list[Any] = [None] * len(reqs)
        for pair in (False, True):
            idx = [i for i, r in enumerate(reqs) if r.token_ids is None and (r.text_pair is not None) == pair]
            if not idx:
                continue
            enc = self.bt.tok([reqs[i].text for i in idx], [reqs[i].text_pair for i in idx] if pair else None,
                              truncation=True, max_length=limit, return_attention_mask=False)
            tts = enc.get("token_type_ids")
            for j, i in enumerate(idx):
                out[i] = (enc["input_ids"][j], tts[j] if tts is not None else None)
        for i, r in enumerate(reqs):
            if r.token_ids is not None:
                ids = list(r.token_ids[:max_len]) if self.truncate else list(r.token_ids)
                out[i] = (ids, None)
        return out

    def pack(self, works: list[Any]) -> Any:
        items = [RequestItem(tenant_id=w.request.tenant_id, token_ids=w.token_ids, token_type_ids=w.token_type_ids,
                             request_id=w.request.request_id) for w in works]
        return self.bt.pack(items)
