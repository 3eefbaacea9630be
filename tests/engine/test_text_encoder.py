"""TextEncoder (raw Rust tokenizer, ASCII fast path) gives exactly the transformers tokenizer's ids."""

import random

import pytest

from workers.engine.tokenize import TextEncoder

TRICKY = ["", " ", "Hello, World!", "HELLO [MASK] world", "hello [mask] world", "[CLS] x [SEP]", "[Sep]",
          "tab\there", "new\nline", "bell\x07char", "nul\x00char", "Café Déjà vu", "naïve résumé", "東京 is big",
          "emoji 😀 text", "ﬁ ligature", "ALL CAPS SHOUTING TEXT", "don't stop-believing... (ok)?!",
          "x" * 150, "supercalifragilisticexpialidocious" * 4, "a\u00a0b", "\ufeffbom", "zero\u200bwidth",
          "𝐁𝐨𝐥𝐝 math", "İstanbul", "ǅ titlecase", "~`!@#$%^&*()_+-={}|[]\\:\";'<>?,./"]


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    words = ("The market RALLIED after strong earnings, while the central-bank held rates; "
             "analysts expect growth to slow. Team won 3-2! café naïve 東京 [MASK] [unk] 😀 don't").split()
    out = list(TRICKY)
    for _ in range(n):
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 80))))
    return out


@pytest.mark.parametrize("max_length", [8, 64, 513])
def test_ids_equal_transformers(minilm_dir, max_length):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(minilm_dir, use_fast=True)
    enc = TextEncoder(hf)
    texts = corpus()
    for _ in range(3):  # warms the chunk cache: the last call takes the cached path
        enc.encode(texts, None, max_length)
    got = enc.encode(texts, None, max_length)
    ref = hf(texts, truncation=True, max_length=max_length, return_attention_mask=False)
    for i, (ids, tt) in enumerate(got):
        assert ids == ref["input_ids"][i], texts[i]
        assert tt is None and not any(ref["token_type_ids"][i])
    rng = random.Random(1)
    a, b = texts, [rng.choice(texts) for _ in texts]
    got = enc.encode(a, b, max_length)
    ref = hf(a, b, truncation=True, max_length=max_length, return_attention_mask=False)
    for i, (ids, tt) in enumerate(got):
        assert ids == ref["input_ids"][i] and tt == ref["token_type_ids"][i], (a[i], b[i])


def test_ascii_fast_path_is_taken_only_when_safe(minilm_dir):
    from transformers import AutoTokenizer
    enc = TextEncoder(AutoTokenizer.from_pretrained(minilm_dir))
    assert enc._ascii("Hello World") == "hello world"
    for t in ("Café", "a\tb", "x [MASK] y", "x [mask] y", "\x00"):
        assert enc._ascii(t) is None, t


@pytest.mark.parametrize("miss_ratio", [float("inf"), TextEncoder.MISS_RATIO])
def test_random_printable_ascii_single_texts_match(minilm_dir, miss_ratio):
    """The chunk-cache path: random printable ASCII (punctuation runs, digits, case, words over
    WordPiece's 100-character limit), several limits; a small cache (full: Rust takes the batch)
    and an unbounded one (inf: the chunk path every time, however cold)."""
    import string

    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(minilm_dir)
    enc = TextEncoder(hf)
    assert enc._affix is not None
    enc.MISS_RATIO = miss_ratio  # inf: the chunk path always, however cold the cache
    enc.CHUNK_CACHE = 10**9 if miss_ratio == float("inf") else 50
    rng = random.Random(2)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "     "
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(300)]
    texts += ["a" * 99, "b" * 100, "c" * 101, "x" * 250 + " y", "  leading and trailing  ", "!!!???..."]
    calls = []
    real = enc._singles_ascii
    enc._singles_ascii = lambda *a: calls.append(real(*a)) or calls[-1]
    for max_length in (3, 5, 16, 128, 600):
        for lo in range(0, len(texts), 50):  # several calls: the cache is filled, hit and cleared
            chunk = texts[lo:lo + 50]
            ref = hf(chunk, truncation=True, max_length=max_length)["input_ids"]
            assert [ids for ids, _ in enc.encode(chunk, None, max_length)] == ref, max_length
    if miss_ratio == float("inf"):
        assert all(c is not None for c in calls) and len(calls) == 5 * len(range(0, len(texts), 50))
