"""Tokenisation at intake (batched, fast tokenizer) and packing of tokenised work for the engine."""

from __future__ import annotations

from typing import Any

from schema.messages import InferRequest
from workers.engine.batch import RequestItem
from workers.engine.tokenize import BatchTokenizer, TextEncoder


class IntakeTokenizer:
    """Token ids for decoded requests, per intake batch.

    Texts go through ``TextEncoder`` (raw Rust tokenizer, no offsets, ASCII fast path): the ids
    equal the transformers tokenizer's. Set TOKENIZERS_PARALLELISM=false in processes that share
    the host's cores with other tokenising processes (edge processes): the Rust pool then only adds
    CPU per text; leave it on where one process tokenises for a whole host.
    """

    def __init__(self, model_dir: str, truncate: bool):
        self.bt = BatchTokenizer(str(model_dir))
        self.text = TextEncoder(self.bt.tok)
        self.truncate = truncate
        self.vocab_size = len(self.bt.tok)

    def ids(self, reqs: list[InferRequest], max_len: int) -> list[tuple[list[int], list[int] | None]]:
        """(token ids, token type ids or None for all-zero) per request, in order: one call per
        intake batch (the data plane calls this per decoded batch). Without truncation, one token
        more than allowed is kept so that the caller can tell an oversize input from one that fits
        exactly. Pre-tokenised ``token_ids`` are returned as given (truncated when configured)."""
        limit = max_len if self.truncate else max_len + 1
        out: list[Any] = [None] * len(reqs)
        singles: list[int] = []
        pairs: list[int] = []
        for i, r in enumerate(reqs):
            if r.token_ids is not None:
                out[i] = (r.token_ids[:max_len] if self.truncate else r.token_ids, None)
            elif r.text_pair is None:
                singles.append(i)
            else:
                pairs.append(i)
        if singles:
            for i, enc in zip(singles, self.text.encode([reqs[i].text for i in singles], None, limit)):
                out[i] = enc
        if pairs:
            for i, enc in zip(pairs, self.text.encode([reqs[i].text for i in pairs],
                                                      [reqs[i].text_pair for i in pairs], limit)):
                out[i] = enc
        return out

    def pack(self, works: list[Any]) -> Any:
        items = [RequestItem(tenant_id=w.request.tenant_id, token_ids=w.token_ids, token_type_ids=w.token_type_ids,
                             request_id=w.request.request_id) for w in works]
        return self.bt.pack(items)
