"""The batch-level output object (BatchOutputs): failed tenants mixed with good rows, token
classification, label counts differing per tenant — every row checked against the independent
single-tenant reference (plain transformers with merged weights / hooks, conftest.Reference), and
the reply ``outputs`` map against one built from that reference. Also the numpy pack."""

import numpy as np
import pytest
import torch

from workers.engine.batch import BatchOutputs, PackedBatch, RequestItem, RowOutput
from workers.engine.errors import AdapterLoadError, BatchError, UnknownTenant
from workers.engine.pool import PoolConfig
from workers.engine.runtime import Engine
from workers.engine.tokenize import BatchTokenizer

from .conftest import Reference, dims_of, random_batch, random_delta, rel_err


@pytest.fixture(scope="module")
def mixed(tiny_bert_dir):
    rng = np.random.default_rng(7)
    dims = dims_of(tiny_bert_dir)
    pets = ("lora", "adapter", "bitfit", "ia3", "lora", "diff")
    deltas = {}
    for i in range(12):  # label counts 2..8 and both tasks, so label buckets and widths differ
        task = "token_cls" if i % 3 == 0 else "seq_cls"
        deltas[f"t{i}"] = random_delta(f"t{i}", pets[i % len(pets)], dims, rng, task=task, n_labels=2 + (i * 5) % 7)

    def load(tid):
        if tid == "broken":
            raise RuntimeError("store down")
        return deltas[tid]  # KeyError for "ghost": unknown tenant
    eng = Engine(tiny_bert_dir, load, device="cpu", pool_config=PoolConfig(default_slots=16))
    batch = random_batch(list(deltas) + ["broken", "ghost"], rng, vocab=120, seqs_per_tenant=(1, 3))
    try:
        outs = eng.run(batch, timeout=120)
    finally:
        eng.close()
    return deltas, batch, outs


def _reference_rows(tiny_bert_dir, deltas, batch):
    ref = Reference(tiny_bert_dir)
    cu = batch.cu_seqlens.tolist()
    want = []
    for i, tid in enumerate(batch.tenant_ids):
        if tid not in deltas:
            want.append(None)
            continue
        tt = batch.token_type_ids[cu[i]:cu[i + 1]] if batch.token_type_ids is not None else None
        want.append(ref.logits(deltas[tid], batch.input_ids[cu[i]:cu[i + 1]], tt))
    return want


def test_rows_match_reference_with_failed_tenants_mixed_in(tiny_bert_dir, mixed):
    deltas, batch, outs = mixed
    assert isinstance(outs, BatchOutputs) and len(outs) == batch.num_seqs
    assert {"broken", "ghost"} <= set(batch.tenant_ids) and len(set(batch.tenant_ids)) > 10
    want = _reference_rows(tiny_bert_dir, deltas, batch)
    seen_tasks = set()
    for i, (o, w) in enumerate(zip(outs, want)):
        assert isinstance(o, RowOutput)
        assert o.tenant_id == batch.tenant_ids[i] and o.request_id == batch.request_ids[i]
        if w is None:  # failed tenant: its own typed error, no prediction
            assert isinstance(o.error, UnknownTenant if o.tenant_id == "ghost" else AdapterLoadError), o.error
            assert o.label is None and o.scores is None and o.token_labels is None and o.labels is None
            assert o.adapter_version is None
            continue
        d = deltas[o.tenant_id]
        names = d.config["labels"]
        assert o.error is None and o.adapter_version == d.version and o.task == d.config["task"]
        assert o.labels == names
        seen_tasks.add(o.task)
        if o.task == "seq_cls":
            assert len(o.scores) == len(names) == len(o.logits)
            assert rel_err(o.logits, w) < 1e-4
            p = torch.softmax(w, -1)
            assert np.allclose(o.scores, p.numpy(), atol=1e-5)
            assert o.label == names[int(torch.tensor(o.scores).argmax())]
            assert o.label == names[int(w.argmax())] or abs(float(p.max() - p.sort().values[-2])) < 1e-4
            assert o.token_labels is None and o.token_scores is None
        else:
            p = torch.softmax(w, -1)  # [L, C]
            assert len(o.token_scores) == w.shape[0] and all(len(r) == len(names) for r in o.token_scores)
            assert rel_err(torch.log(torch.tensor(o.token_scores)), torch.log_softmax(w, -1)) < 1e-4
            assert o.token_labels == [names[j] for j in torch.tensor(o.token_scores).argmax(-1).tolist()]
            assert o.scores is None and o.label is None
    assert seen_tasks == {"seq_cls", "token_cls"}


def test_reply_outputs_match_reference_and_old_outputs_of(tiny_bert_dir, mixed):
    from workers.serving.replies import outputs_of, reply_for_output
    deltas, batch, outs = mixed
    want = _reference_rows(tiny_bert_dir, deltas, batch)
    for i, w in enumerate(want):
        o = outs[i]
        if w is None:
            rep = reply_for_output(o, request_id=str(i), tenant_id=o.tenant_id, worker_id="w", timings={})
            assert rep.status.value != "ok" and rep.outputs in (None, {})
            continue
        names = deltas[o.tenant_id].config["labels"]
        got = outputs_of(o)
        assert got == o.reply_outputs()
        assert got == outputs_of(o.to_request_output())  # the RequestOutput path gives the same map
        p = torch.softmax(w, -1)
        if o.task == "seq_cls":
            assert set(got) == {"label", "scores", "labels"} and got["labels"] == names
            assert np.allclose(got["scores"], p.numpy(), atol=1e-5)
            assert got["label"] == names[int(np.argmax(got["scores"]))]
        else:
            assert set(got) == {"token_labels", "token_scores"}
            assert np.allclose(got["token_scores"], p.max(-1).values.numpy(), atol=1e-5)
            assert got["token_labels"] == [names[j] for j in p.argmax(-1).tolist()] or \
                np.allclose(got["token_scores"], p.max(-1).values.numpy(), atol=1e-5)
        rep = reply_for_output(o, request_id=str(i), tenant_id=o.tenant_id, worker_id="w", timings={})
        assert rep.status.value == "ok" and rep.outputs == got


def test_batch_arrays_are_consistent(mixed):
    deltas, batch, outs = mixed
    for i in range(len(outs)):
        tid = batch.tenant_ids[i]
        if tid not in deltas:
            assert outs.n_labels[i] == 0
            continue
        n = len(deltas[tid].config["labels"])
        assert outs.n_labels[i] == n
        if deltas[tid].config["task"] == "seq_cls":
            assert not outs.scores[i, n:].any()  # padded columns are zero
            assert outs.top_idx[i] == int(np.argmax(outs.scores[i, :n]))
            assert outs.top_score[i] == pytest.approx(float(outs.scores[i, :n].max()))
        else:
            s, ln = int(outs.tok_start[i]), int(outs.tok_len[i])
            assert ln == int(batch.cu_seqlens[i + 1] - batch.cu_seqlens[i])
            assert (outs.tok_top_idx[s:s + ln] == outs.tok_scores[s:s + ln, :n].argmax(-1)).all()
    assert [e is not None for e in outs.errors()] == [t not in deltas for t in batch.tenant_ids]
    assert outs[-1].tenant_id == batch.tenant_ids[-1]
    with pytest.raises(IndexError):
        outs[len(outs)]


def test_slice_and_pickle_keep_rows(mixed):
    import pickle
    _, batch, outs = mixed
    n = len(outs)
    for a, b in ((0, n), (1, n - 2), (n // 2, n)):
        part = outs.slice(a, b)
        assert len(part) == b - a
        for j in range(b - a):
            x, y = part[j].to_request_output(), outs[a + j].to_request_output()
            assert (x.tenant_id, x.request_id, x.label, x.scores, x.token_scores, x.labels, type(x.error)) == \
                (y.tenant_id, y.request_id, y.label, y.scores, y.token_scores, y.labels, type(y.error))
            assert part[j].reply_outputs() == outs[a + j].reply_outputs() if y.error is None else True
    back = pickle.loads(pickle.dumps(outs))
    assert [r.reply_outputs() if r.error is None else str(r.error) for r in back] == \
        [r.reply_outputs() if r.error is None else str(r.error) for r in outs]


def test_whole_batch_failure_is_one_error_per_row(tiny_bert_dir):
    rng = np.random.default_rng(0)
    d = random_delta("a", "lora", dims_of(tiny_bert_dir), rng, task="seq_cls")
    eng = Engine(tiny_bert_dir, lambda t: d, device="cpu")
    try:
        bad = PackedBatch(torch.tensor([1, 2, 5000, 3]), torch.tensor([0, 2, 4]), ["a", "a"], request_ids=["x", "y"])
        outs = eng.run(bad, timeout=60)
    finally:
        eng.close()
    assert len(outs) == 2 and [o.request_id for o in outs] == ["x", "y"]
    assert all(isinstance(o.error, BatchError) and o.scores is None for o in outs)


def test_pack_matches_naive_concatenation():
    tok = BatchTokenizer.__new__(BatchTokenizer)  # token ids only: no tokenizer files needed
    tok.tok, tok.max_length = None, 6
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, 500, size=int(n)).tolist() for n in rng.integers(1, 10, size=40)]
    items = [RequestItem(f"t{i % 5}", token_ids=s if i % 4 else np.asarray(s), request_id=i,
                         token_type_ids=[1] * len(s) if i % 7 == 0 else None) for i, s in enumerate(seqs)]
    b = tok.pack(items)
    cut = [s[:6] for s in seqs]
    assert b.input_ids.tolist() == [t for s in cut for t in s]
    assert b.cu_seqlens.tolist() == [0] + np.cumsum([len(s) for s in cut]).tolist()
    assert b.token_type_ids.tolist() == [int(i % 7 == 0) for i, s in enumerate(cut) for _ in s]
    assert b.tenant_ids == [f"t{i % 5}" for i in range(40)] and b.request_ids == list(range(40))
    plain = tok.pack([RequestItem("a", token_ids=[5, 6, 7])])
    assert plain.token_type_ids is None  # all-zero token types are not shipped
    with pytest.raises(BatchError):
        tok.pack([RequestItem("a", token_ids=[])])
    with pytest.raises(BatchError):
        tok.pack([RequestItem("a", token_ids=[1, 2], token_type_ids=[0])])
