"""Flock's canonical tensor layout for every PET type.

One place says which tensors a tenant delta of a given PET type holds and what shape each has
for a given base model. The adapter store validates imports against it; the engine loads from
it. Pure Python (no torch) so that both the CLI and the GPU machine can import it.

Naming: ``layers.{i}.{site}.{param}`` for per-layer tensors, ``head.weight`` / ``head.bias`` for
the task head. A two-layer sequence-classification head (config ``head: {"layers": 2,
"activation": "tanh" | "relu"}``: RoBERTa's ``classifier.dense`` + tanh + ``classifier.out_proj``,
DistilBERT's ``pre_classifier`` + ReLU + ``classifier``) adds ``head.dense.weight`` (h, h) and
``head.dense.bias`` (h): logits = head(act(dense(pooled))). Linear sites of a BERT layer, with (in, out) features:

    q, k, v      hidden -> hidden        attention projections
    attn_out     hidden -> hidden        attention output dense
    ffn_in       hidden -> intermediate  feed-forward up-projection
    ffn_out      intermediate -> hidden  feed-forward down-projection
    pooler       hidden -> hidden        the base model's pooler dense (LoRA / IA3 only; not per
                                         layer: tensors ``pooler.{param}``; acts with pooling "pooler")

Weights follow the torch ``nn.Linear`` convention (out, in).

LoRA and IA3 place a delta on a set of (layer, site) cells: ``sites`` on every layer of ``layers``,
or, with ``site_layers`` ({entry: [layers]}), each entry on its own layers (PEFT regex targets,
``layers_to_transform`` with mixed module sets). IA3 entries are ``SITE.out`` (the site's output,
bias included, times l) or ``SITE.in`` (its input times l, PEFT ``feedforward_modules``); the
legacy names ``k``, ``v`` (= ``k.out``, ``v.out``) and ``ffn_in`` (= ``ffn_out.in``: the
intermediate activation after the nonlinearity) keep their tensor names ``layers.i.S.scale``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from schema.pet import PET_TYPES

LINEAR_SITES = ("q", "k", "v", "attn_out", "ffn_in", "ffn_out")
POOLER = "pooler"
PEFT_SITES = LINEAR_SITES + (POOLER,)  # where LoRA / IA3 deltas may sit
IA3_LEGACY = {"k": ("k", "out"), "v": ("v", "out"), "ffn_in": ("ffn_out", "in")}
IA3_ENTRIES = tuple(IA3_LEGACY) + tuple(f"{s}.{m}" for s in PEFT_SITES for m in ("in", "out"))
LAYERNORM_SITES = ("attn_ln", "ffn_ln")  # LN after attention block / after FFN block
ADAPTER_PLACEMENTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}
ADAPTER_ACTIVATIONS = ("relu", "gelu", "tanh")
TASKS = ("seq_cls", "token_cls")
# seq_cls pooling: "pooler" = the base model's dense+tanh over [CLS] (HF *ForSequenceClassification),
# "cls" = raw [CLS] hidden state, "mean" = mean over the sequence's tokens (sentence-transformers).
POOLINGS = ("pooler", "cls", "mean")
HEAD_ACTIVATIONS = ("tanh", "relu")  # of a two-layer seq_cls head (RoBERTa: tanh, DistilBERT: relu)

MAX_LORA_RANK = 256
MAX_BOTTLENECK = 1024
MAX_LABELS = 1024


class LayoutError(ValueError):
    """A tenant delta does not fit the layout for its PET type and base model."""


@dataclass(frozen=True)
class BaseDims:
    """The few numbers of a base model that decide every delta's shape."""

    hidden: int
    intermediate: int
    layers: int
    heads: int

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "BaseDims":
        # DistilBERT names its fields differently from BERT/RoBERTa/MiniLM.
        if cfg.get("model_type") == "distilbert":
            return cls(cfg["dim"], cfg["hidden_dim"], cfg["n_layers"], cfg["n_heads"])
        return cls(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                   cfg["num_attention_heads"])

    def site_shape(self, site: str) -> tuple[int, int]:
        """(out, in) of a linear site."""
        h, m = self.hidden, self.intermediate
        return {"q": (h, h), "k": (h, h), "v": (h, h), "attn_out": (h, h),
                "ffn_in": (m, h), "ffn_out": (h, m), "pooler": (h, h)}[site]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...] | None  # None: 1-D of any length (sparse payloads)
    dtype: str  # "float", "int", "uint8"


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise LayoutError(msg)


def _layers(cfg: Mapping[str, Any], dims: BaseDims) -> list[int]:
    layers = cfg.get("layers")
    if layers is None:
        return list(range(dims.layers))
    _need(isinstance(layers, list) and all(isinstance(i, int) for i in layers),
          "config.layers must be a list of layer indices")
    _need(all(0 <= i < dims.layers for i in layers), f"config.layers outside 0..{dims.layers - 1}")
    _need(len(set(layers)) == len(layers), "config.layers has duplicates")
    return sorted(layers)


def _sites(cfg: Mapping[str, Any], allowed: tuple[str, ...], default: tuple[str, ...]) -> list[str]:
    sites = cfg.get("sites", list(default))
    _need(isinstance(sites, list) and sites, "config.sites must be a non-empty list")
    bad = [s for s in sites if s not in allowed]
    _need(not bad, f"unsupported sites {bad}; allowed {list(allowed)}")
    _need(len(set(sites)) == len(sites), "config.sites has duplicates")
    return list(sites)


def ia3_entry(entry: str) -> tuple[str, str]:
    """(site, "in" | "out") of an IA3 entry (legacy names included)."""
    if entry in IA3_LEGACY:
        return IA3_LEGACY[entry]
    site, mode = entry.rsplit(".", 1)
    return site, mode


def ia3_tensor(entry: str, layer: int | None) -> str:
    """Tensor name of one IA3 scale: legacy ``layers.i.S.scale``, else ``layers.i.S.{in,out}_scale``."""
    if entry in IA3_LEGACY:
        return f"layers.{layer}.{entry}.scale"
    site, mode = ia3_entry(entry)
    return f"{site}.{mode}_scale" if site == POOLER else f"layers.{layer}.{site}.{mode}_scale"


def ia3_size(entry: str, dims: "BaseDims") -> int:
    site, mode = ia3_entry(entry)
    out_f, in_f = dims.site_shape(site)
    return in_f if mode == "in" else out_f


def cells(cfg: Mapping[str, Any], dims: BaseDims, entries: list[str]) -> list[tuple[int, str]]:
    """(layer, entry) pairs a LoRA / IA3 delta covers (per-layer entries only; the pooler is not
    per layer). ``site_layers`` ({entry: [layers]}) overrides the ``sites`` x ``layers`` product."""
    per_layer = [e for e in entries if e != POOLER and not e.startswith(POOLER + ".")]
    sl = cfg.get("site_layers")
    if sl is None:
        return [(i, e) for i in _layers(cfg, dims) for e in per_layer]
    _need(isinstance(sl, dict), "config.site_layers must map each site to a list of layer indices")
    _need(sorted(sl) == sorted(per_layer), f"config.site_layers keys {sorted(sl)} must be the "
          f"per-layer sites {sorted(per_layer)}")
    out = []
    for e in per_layer:
        _need(isinstance(sl[e], list) and bool(sl[e]), f"config.site_layers[{e!r}] must be a non-empty list")
        ls = _layers({"layers": sl[e]}, dims)
        out += [(i, e) for i in ls]
    return sorted(out)


def _ia3_entries(cfg: Mapping[str, Any]) -> list[str]:
    entries = _sites(cfg, IA3_ENTRIES, ("k", "v", "ffn_in"))
    canon = [ia3_entry(e) for e in entries]
    _need(len(set(canon)) == len(canon), "config.sites names one IA3 scale twice "
          "(legacy k, v, ffn_in are k.out, v.out, ffn_out.in)")
    return entries


def head_kind(cfg: Mapping[str, Any]) -> tuple[int, str | None]:
    """(layers, activation) of a delta's task head: (1, None) or (2, "tanh" | "relu")."""
    head = cfg.get("head")
    if head is None:
        return 1, None
    _need(isinstance(head, dict) and set(head) <= {"layers", "activation"},
          'config.head must be {"layers": 1} or {"layers": 2, "activation": "tanh" | "relu"}')
    layers = head.get("layers", 1)
    _need(layers in (1, 2) and not isinstance(layers, bool), "config.head.layers must be 1 or 2")
    if layers == 1:
        _need("activation" not in head, "config.head.activation needs config.head.layers 2")
        return 1, None
    act = head.get("activation")
    _need(act in HEAD_ACTIVATIONS, f"config.head.activation must be one of {list(HEAD_ACTIVATIONS)}")
    _need(cfg.get("task") == "seq_cls", "a two-layer head (config.head.layers 2) is for task seq_cls only")
    return 2, act


def validate_config(pet_type: str, cfg: Mapping[str, Any]) -> None:
    """Check a delta's config for sanity (independently of tensors)."""
    _need(pet_type in PET_TYPES, f"unsupported PET type {pet_type!r}; supported {list(PET_TYPES)}")
    task = cfg.get("task")
    _need(task in TASKS, f"config.task must be one of {list(TASKS)}")
    labels = cfg.get("labels")
    _need(isinstance(labels, list) and 1 <= len(labels) <= MAX_LABELS
          and all(isinstance(x, str) and x for x in labels),
          f"config.labels must be 1..{MAX_LABELS} non-empty strings")
    _need(len(set(labels)) == len(labels), "config.labels has duplicates")
    if task == "seq_cls":
        _need(cfg.get("pooling", "cls") in POOLINGS, f"config.pooling must be one of {list(POOLINGS)}")
    head_kind(cfg)  # task head: one linear layer, or dense + activation + linear (seq_cls)
    if pet_type in ("lora", "ia3") and cfg.get("site_layers") is not None:
        _need(cfg.get("layers") is None, "config.layers and config.site_layers are exclusive")
    if pet_type == "lora":
        r = cfg.get("r")
        _need(isinstance(r, int) and 1 <= r <= MAX_LORA_RANK, f"config.r must be 1..{MAX_LORA_RANK}")
        alpha = cfg.get("alpha", r)
        _need(isinstance(alpha, (int, float)) and 0 < alpha <= 1e4, "config.alpha must be in (0, 1e4]")
    if pet_type == "adapter":
        _need(cfg.get("variant") in ADAPTER_PLACEMENTS,
              f"config.variant must be one of {list(ADAPTER_PLACEMENTS)}")
        b = cfg.get("bottleneck")
        _need(isinstance(b, int) and 1 <= b <= MAX_BOTTLENECK, f"config.bottleneck must be 1..{MAX_BOTTLENECK}")
        _need(cfg.get("activation", "relu") in ADAPTER_ACTIVATIONS,
              f"config.activation must be one of {list(ADAPTER_ACTIVATIONS)}")


def lowest_layer(names: Iterable[str], layers: int) -> int:
    """The lowest layer a delta's tensors (``layers.{i}.*``) touch; ``layers`` when none do (a
    head-only delta). Lower-layer skipping serves a tenant from the table when this is >= K."""
    found = [int(m.group(1)) for n in names if (m := _LAYER_NAME.match(n))]
    return min(found, default=layers)


_LAYER_NAME = re.compile(r"^layers\.(\d+)\.")


def lora_scale(cfg: Mapping[str, Any]) -> float:
    return float(cfg.get("alpha", cfg["r"])) / float(cfg["r"])


def expected_tensors(pet_type: str, cfg: Mapping[str, Any], dims: BaseDims) -> list[TensorSpec]:
    """Every tensor a valid delta holds. Optional tensors are not listed (see optional_tensors)."""
    validate_config(pet_type, cfg)
    specs: list[TensorSpec] = []
    layers = _layers(cfg, dims)
    if pet_type == "lora":
        r = cfg["r"]
        sites = _sites(cfg, PEFT_SITES, ("q", "v"))
        for i, s in cells(cfg, dims, sites):
            out_f, in_f = dims.site_shape(s)
            specs.append(TensorSpec(f"layers.{i}.{s}.lora_A", (r, in_f), "float"))
            specs.append(TensorSpec(f"layers.{i}.{s}.lora_B", (out_f, r), "float"))
        if POOLER in sites:
            specs.append(TensorSpec("pooler.lora_A", (r, dims.hidden), "float"))
            specs.append(TensorSpec("pooler.lora_B", (dims.hidden, r), "float"))
    elif pet_type == "adapter":
        b, h = cfg["bottleneck"], dims.hidden
        for i in layers:
            for p in ADAPTER_PLACEMENTS[cfg["variant"]]:
                specs += [TensorSpec(f"layers.{i}.adapter_{p}.down.weight", (b, h), "float"),
                          TensorSpec(f"layers.{i}.adapter_{p}.down.bias", (b,), "float"),
                          TensorSpec(f"layers.{i}.adapter_{p}.up.weight", (h, b), "float"),
                          TensorSpec(f"layers.{i}.adapter_{p}.up.bias", (h,), "float")]
    elif pet_type == "bitfit":
        for i in layers:
            for s in LINEAR_SITES:
                specs.append(TensorSpec(f"layers.{i}.{s}.bias", (dims.site_shape(s)[0],), "float"))
    elif pet_type == "ia3":
        entries = _ia3_entries(cfg)
        for i, e in cells(cfg, dims, entries):
            specs.append(TensorSpec(ia3_tensor(e, i), (ia3_size(e, dims),), "float"))
        for e in entries:
            if ia3_entry(e)[0] == POOLER:
                specs.append(TensorSpec(ia3_tensor(e, None), (dims.hidden,), "float"))
    elif pet_type == "diff":
        for i in layers:
            for s in _sites(cfg, LINEAR_SITES, LINEAR_SITES):
                specs.append(TensorSpec(f"layers.{i}.{s}.delta_index", None, "int"))
                specs.append(TensorSpec(f"layers.{i}.{s}.delta_value", None, "float"))
    elif pet_type == "maskbert":
        for i in layers:
            for s in _sites(cfg, LINEAR_SITES, LINEAR_SITES):
                out_f, in_f = dims.site_shape(s)
                specs.append(TensorSpec(f"layers.{i}.{s}.mask_bits", ((out_f * in_f + 7) // 8,), "uint8"))
    n_labels, h = len(cfg["labels"]), dims.hidden
    if head_kind(cfg)[0] == 2:
        specs += [TensorSpec("head.dense.weight", (h, h), "float"), TensorSpec("head.dense.bias", (h,), "float")]
    specs += [TensorSpec("head.weight", (n_labels, h), "float"), TensorSpec("head.bias", (n_labels,), "float")]
    return specs


def optional_tensors(pet_type: str, cfg: Mapping[str, Any], dims: BaseDims) -> list[TensorSpec]:
    """Tensors a delta may carry in addition: LayerNorm deltas (BitFit), bias deltas (diff)."""
    layers = _layers(cfg, dims)
    specs: list[TensorSpec] = []
    if pet_type == "bitfit":
        for i in layers:
            for ln in LAYERNORM_SITES:
                specs += [TensorSpec(f"layers.{i}.{ln}.weight", (dims.hidden,), "float"),
                          TensorSpec(f"layers.{i}.{ln}.bias", (dims.hidden,), "float")]
    if pet_type == "diff":
        for i in layers:
            for s in _sites(cfg, LINEAR_SITES, LINEAR_SITES):
                specs.append(TensorSpec(f"layers.{i}.{s}.bias", (dims.site_shape(s)[0],), "float"))
    return specs
