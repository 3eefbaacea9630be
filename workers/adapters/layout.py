"""Flock's canonical tensor layout for every PET type.

One place says which tensors a tenant delta of a given PET type holds and what shape each has
for a given base model. The adapter store validates imports against it; the engine loads from
it. Pure Python (no torch) so that both the CLI and the GPU machine can import it.

Naming: ``layers.{i}.{site}.{param}`` for per-layer tensors, ``head.weight`` / ``head.bias`` for
the task head. Linear sites of a BERT layer, with (in, out) features:

    q, k, v      hidden -> hidden        attention projections
    attn_out     hidden -> hidden        attention output dense
    ffn_in       hidden -> intermediate  feed-forward up-projection
    ffn_out      intermediate -> hidden  feed-forward down-projection

Weights follow the torch ``nn.Linear`` convention (out, in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from schema.pet import PET_TYPES

LINEAR_SITES = ("q", "k", "v", "attn_out", "ffn_in", "ffn_out")
LAYERNORM_SITES = ("attn_ln", "ffn_ln")  # LN after attention block / after FFN block
ADAPTER_PLACEMENTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}
ADAPTER_ACTIVATIONS = ("relu", "gelu", "tanh")
TASKS = ("seq_cls", "token_cls")
# seq_cls pooling: "pooler" = the base model's dense+tanh over [CLS] (HF *ForSequenceClassification),
# "cls" = raw [CLS] hidden state, "mean" = mean over the sequence's tokens (sentence-transformers).
POOLINGS = ("pooler", "cls", "mean")

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
                "ffn_in": (m, h), "ffn_out": (h, m)}[site]


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


def lora_scale(cfg: Mapping[str, Any]) -> float:
    return float(cfg.get("alpha", cfg["r"])) / float(cfg["r"])


def expected_tensors(pet_type: str, cfg: Mapping[str, Any], dims: BaseDims) -> list[TensorSpec]:
    """Every tensor a valid delta holds. Optional tensors are not listed (see optional_tensors)."""
    validate_config(pet_type, cfg)
    specs: list[TensorSpec] = []
    layers = _layers(cfg, dims)
    if pet_type == "lora":
        r = cfg["r"]
        for i in layers:
            for s in _sites(cfg, LINEAR_SITES, ("q", "v")):
                out_f, in_f = dims.site_shape(s)
                specs.append(TensorSpec(f"layers.{i}.{s}.lora_A", (r, in_f), "float"))
                specs.append(TensorSpec(f"layers.{i}.{s}.lora_B", (out_f, r), "float"))
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
        for i in layers:
            for s in _sites(cfg, ("k", "v", "ffn_in"), ("k", "v", "ffn_in")):
                specs.append(TensorSpec(f"layers.{i}.{s}.scale", (dims.site_shape(s)[0],), "float"))
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
