"""Tokenisation helper: (tenant, text | text pair | token ids) items -> PackedBatch."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Sequence

import numpy as np
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
        return self._pack_ids(items, ids, tts)

    def _pack_ids(self, items: Sequence[RequestItem], ids: list, tts: list) -> PackedBatch:
        """Flatten per-item ids (lists or int arrays) into one packed batch: whole-array numpy
        (one np.fromiter / np.concatenate, one cumsum), no per-token Python."""
        n = len(items)
        ml = self.max_length
        for i, it in enumerate(items):
            if it.token_ids is not None:
                x = it.token_ids
                if len(x) == 0:
                    raise BatchError("empty token_ids")
                ids[i] = x if len(x) <= ml else x[:ml]
                t = it.token_type_ids
                tts[i] = (t if len(t) <= ml else t[:ml]) if t is not None and len(t) else None
        lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        total = int(cu[-1])
        flat = _flatten(ids, total)
        tt = None
        if any(t is not None for t in tts):
            tl = np.fromiter((len(t) if t is not None else 0 for t in tts), dtype=np.int64, count=n)
            given = np.fromiter((t is not None for t in tts), dtype=bool, count=n)
            if (tl[given] != lens[given]).any():
                raise BatchError("token_type_ids length differs from token_ids")
            tt_np = _flatten([t if t is not None else itertools.repeat(0, int(lens[i])) for i, t in enumerate(tts)],
                             total)
            if tt_np.any():  # all zero (single texts): same embedding as no token types, nothing to ship
                tt = torch.from_numpy(tt_np)
        return PackedBatch(torch.from_numpy(flat), torch.from_numpy(cu), [it.tenant_id for it in items], tt,
                           [it.request_id for it in items], enqueued_at=time.perf_counter())


def _flatten(seqs: list, total: int) -> np.ndarray:
    """int32 [total]: the sequences back to back (lists via one np.fromiter over a chain, arrays via
    np.concatenate)."""
    if seqs and all(isinstance(x, np.ndarray) for x in seqs):
        return np.concatenate(seqs).astype(np.int32, copy=False)
    return np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=total)


class TextEncoder:
    """Texts and text pairs -> (ids, token_type_ids) lists, on the raw Rust ``tokenizers.Tokenizer``
    instead of the transformers wrapper: the same ids as ``hf(texts, pairs, truncation=True,
    max_length=n)`` for ~1/3 of the CPU (bench/codec.py).

    * ``encode_batch_fast`` (no offsets) on a private copy of the backend tokenizer with padding off
      and truncation set once per ``max_length`` (one copy per limit, so calls never reconfigure a
      shared tokenizer).
    * ASCII fast path: BERT's normaliser (clean text, CJK spacing, NFD accent stripping, lowercase)
      costs about half of the whole encode, yet on printable ASCII it is exactly ``str.lower`` (or
      nothing without lowercasing). Such texts go, pre-lowered, through a copy without the
      normaliser. Anything else (non-ASCII, control characters, text containing an added/special
      token's content in any case, other normalisers) takes the full tokenizer, so ids never differ.
    * Single ASCII texts skip most of the Rust pipeline too: BERT's pre-tokeniser splits on
      whitespace first, so a text's ids are [CLS] + the ids of each space-separated chunk + [SEP].
      Chunk ids come from a bounded cache filled by the Rust tokenizer itself (a batched call for
      the misses; at most CHUNK_CACHE chunks, then it stops growing), truncation is the template's (keep the first max_length - 2). Taken only when
      the post-processor is exactly prefix + body + suffix (checked at start-up); pairs always go
      through Rust (longest-first truncation stays Rust's).
    * Single texts get ``None`` token types (all zero); pairs get their lists.

    Not thread-safe to construct concurrently; ``encode`` may be called from several threads.
    TOKENIZERS_PARALLELISM decides whether one call spreads over the Rust thread pool: leave it
    unset for one process per host, set it to ``false`` when several tokenising processes share
    the cores (the pool costs ~7 % more CPU per text; see docs in workers/serving/tokens.py).
    """

    def __init__(self, hf_tokenizer):
        import json
        import re

        backend = hf_tokenizer.backend_tokenizer
        self._json = backend.to_str()
        self._direction = getattr(hf_tokenizer, "truncation_side", "right")
        norm = json.loads(self._json).get("normalizer") or {}
        # None: no ASCII fast path; True/False: printable ASCII normalises to str.lower / itself.
        self._ascii_lower: bool | None = bool(norm.get("lowercase", True)) \
            if norm.get("type") == "BertNormalizer" else None
        added = [t.content for t in backend.get_added_tokens_decoder().values() if t.content]
        self._added = re.compile("|".join(re.escape(a.lower()) for a in added)) if added else None
        self._by_limit: dict[int, tuple] = {}
        self._chunks: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._affix = self._template() if self._ascii_lower is not None and \
            (json.loads(self._json).get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer" else None

    CHUNK_CACHE = 65536  # distinct space-separated chunks kept; when full it stops growing (the
    # first chunks in are the frequent ones under a Zipf law, so it is not cleared)
    MISS_RATIO = 0.25  # more missing chunks than this share of a batch's chunks: Rust takes the batch
    WARM_PER_CALL = 256  # chunks added to the cache per such batch

    def _template(self):
        """(prefix, suffix, chunker) when a single text encodes as prefix + body + suffix, else None."""
        from tokenizers import Tokenizer
        full = Tokenizer.from_str(self._json)
        full.no_padding()
        full.no_truncation()
        chunker = Tokenizer.from_str(self._json)
        chunker.no_padding()
        chunker.no_truncation()
        chunker.normalizer = None
        special = full.encode("").ids
        for probe in ("a", "hello world", "x, y."):
            body = chunker.encode(probe, add_special_tokens=False).ids
            got = full.encode(probe).ids
            k = next((k for k in range(len(special) + 1) if got == special[:k] + body + special[k:]), None)
            if k is None or (probe != "a" and k != prev):
                return None
            prev = k
        return special[:prev], special[prev:], chunker

    def _singles_ascii(self, lows: list[str], max_length: int) -> list[list[int]] | None:
        prefix, suffix, chunker = self._affix
        keep = max_length - len(prefix) - len(suffix)
        if keep <= 0:
            return None
        splits = [x.split() for x in lows]
        with self._lock:
            cache = self._chunks
            missing = {w for ws in splits for w in ws if w not in cache}
            room = self.CHUNK_CACHE - len(cache)
            if len(missing) > self.MISS_RATIO * sum(map(len, splits)) or len(missing) > room:
                # Cold (or full) cache: encoding each missing chunk alone costs more than the whole
                # texts; warm it by a bounded number of chunks and let Rust take this batch.
                ms = list(missing)[:max(0, min(self.WARM_PER_CALL, room))]
                if ms:
                    for w, e in zip(ms, chunker.encode_batch_fast(ms, add_special_tokens=False)):
                        cache[w] = e.ids
                return None
            if missing:
                ms = list(missing)
                for w, e in zip(ms, chunker.encode_batch_fast(ms, add_special_tokens=False)):
                    cache[w] = e.ids
            get = cache.__getitem__
            chain = itertools.chain.from_iterable
            out = []
            for ws in splits:
                body = list(chain(map(get, ws)))
                if len(body) > keep:
                    body = body[:keep] if self._direction == "right" else body[len(body) - keep:]
                out.append(prefix + body + suffix)
        return out

    def _tokenizers(self, max_length: int):
        got = self._by_limit.get(max_length)
        if got is None:
            from tokenizers import Tokenizer
            pair = []
            for fast in (False, True):
                t = Tokenizer.from_str(self._json)
                t.no_padding()
                t.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self._direction)
                if fast:
                    t.normalizer = None
                pair.append(t)
            got = self._by_limit[max_length] = tuple(pair)
        return got

    def _ascii(self, text: str) -> str | None:
        """``text`` as the normaliser would leave it, when that is plain str.lower; else None."""
        if not (text.isascii() and text.isprintable()):
            return None
        low = text.lower()
        if self._added is not None and self._added.search(low):
            return None
        return low if self._ascii_lower else text

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
               max_length: int = 512) -> list[tuple[list[int], list[int] | None]]:
        """One (ids, token_type_ids) per text (per pair with ``pairs``), special tokens added,
        truncated to ``max_length`` (longest first for pairs)."""
        full, fast = self._tokenizers(max_length)
        n = len(texts)
        out: list = [None] * n
        if self._ascii_lower is None:
            slow_idx, fast_idx, fast_in = list(range(n)), [], []
        else:
            slow_idx, fast_idx, fast_in = [], [], []
            asc = self._ascii
            for i in range(n):
                a = asc(texts[i])
                b = asc(pairs[i]) if pairs is not None and a is not None else None
                if a is None or (pairs is not None and b is None):
                    slow_idx.append(i)
                else:
                    fast_idx.append(i)
                    fast_in.append(a if pairs is None else (a, b))
        if pairs is None and fast_idx and self._affix is not None:
            got = self._singles_ascii(fast_in, max_length)
            if got is not None:
                for i, ids in zip(fast_idx, got):
                    out[i] = (ids, None)
                fast_idx, fast_in = [], []
        for tok, idx, inputs in ((fast, fast_idx, fast_in),
                                 (full, slow_idx, [texts[i] if pairs is None else (texts[i], pairs[i])
                                                   for i in slow_idx])):
            if not idx:
                continue
            encs = tok.encode_batch_fast(inputs)
            if pairs is None:
                for i, e in zip(idx, encs):
                    out[i] = (e.ids, None)
            else:
                for i, e in zip(idx, encs):
                    out[i] = (e.ids, e.type_ids)
        return out
