"""Load a HF BERT-family checkpoint directory (safetensors) into Flock's own weight layout.

Supported: BERT (incl. MiniLM), RoBERTa/XLM-R, DistilBERT. Q, K and V are concatenated into one
weight so the shared projection is a single GEMM over the whole packed batch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from schema.layout import BaseDims
from workers.engine.errors import ModelLoadError

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "relu": "relu"}


@dataclass
class LayerWeights:
    """One encoder layer, named by the sites every PET uses (schema/layout.py): the shared GEMM
    groups ``qkv`` (q, k, v fused), ``attn_out``, ``ffn_in``, ``ffn_out`` and the LayerNorms
    ``attn_ln``, ``ffn_ln``."""

    qkv_w: torch.Tensor  # (3h, h) = [q; k; v]
    qkv_b: torch.Tensor
    attn_out_w: torch.Tensor
    attn_out_b: torch.Tensor
    attn_ln_w: torch.Tensor
    attn_ln_b: torch.Tensor
    ffn_in_w: torch.Tensor
    ffn_in_b: torch.Tensor
    ffn_out_w: torch.Tensor
    ffn_out_b: torch.Tensor
    ffn_ln_w: torch.Tensor
    ffn_ln_b: torch.Tensor

    def params(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of a shared GEMM group (qkv, attn_out, ffn_in, ffn_out) or LayerNorm site."""
        return getattr(self, f"{site}_w"), getattr(self, f"{site}_b")

    def site_weight(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of one linear site; q/k/v are views into the fused QKV."""
        if site in ("q", "k", "v"):
            h = self.attn_out_w.shape[0]
            j = "qkv".index(site)
            return self.qkv_w[j * h:(j + 1) * h], self.qkv_b[j * h:(j + 1) * h]
        return self.params(site)


@dataclass
class BaseWeights:
    model_type: str
    dims: BaseDims
    eps: float
    activation: str  # "gelu" | "gelu_tanh" | "relu"
    position_offset: int  # RoBERTa counts positions from padding_idx + 1
    pad_token_id: int
    word_emb: torch.Tensor
    pos_emb: torch.Tensor
    type_emb: torch.Tensor | None
    emb_ln_w: torch.Tensor
    emb_ln_b: torch.Tensor
    layers: list[LayerWeights]
    pooler_w: torch.Tensor | None = None
    pooler_b: torch.Tensor | None = None
    config: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.dims.hidden // self.dims.heads

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "BaseWeights":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype).contiguous()
        layers = [LayerWeights(**{k: mv(v) for k, v in vars(lw).items()}) for lw in self.layers]
        return BaseWeights(self.model_type, self.dims, self.eps, self.activation, self.position_offset,
                           self.pad_token_id, mv(self.word_emb), mv(self.pos_emb), mv(self.type_emb),
                           mv(self.emb_ln_w), mv(self.emb_ln_b), layers, mv(self.pooler_w),
                           mv(self.pooler_b), self.config)


def _read_state(model_dir: str) -> dict[str, torch.Tensor]:
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for s in shards:
            state.update(load_file(os.path.join(model_dir, s)))
        return state
    raise ModelLoadError(f"{model_dir}: no model.safetensors (pickled checkpoints are refused)")


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Task models (BertForSequenceClassification...) nest the encoder under its model-type prefix.
    for p in ("bert.", "roberta.", "xlm-roberta.", "distilbert.", "model."):
        if any(k.startswith(p + "embeddings.") for k in state):
            return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
    return state


def _get(state, *names):
    for n in names:
        if n in state:
            return state[n]
    raise ModelLoadError(f"checkpoint lacks tensor {names[0]}")


def _ln(state, prefix):
    return (_get(state, prefix + ".weight", prefix + ".gamma"), _get(state, prefix + ".bias", prefix + ".beta"))


def load_base(model_dir: str) -> BaseWeights:
    """Read config.json + safetensors; returns fp32 CPU weights (move with .to())."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ModelLoadError(f"{model_dir}: cannot read config.json: {e}") from e
    mt = cfg.get("model_type", "bert")
    state = {k: v.float() for k, v in _strip_prefix(_read_state(model_dir)).items()}
    dims = BaseDims.from_hf_config(cfg)
    if mt == "distilbert":
        return _load_distilbert(cfg, state, dims)
    if mt not in ("bert", "roberta", "xlm-roberta", "camembert", "electra"):
        raise ModelLoadError(f"unsupported model_type {mt!r}")
    act = cfg.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ModelLoadError(f"unsupported hidden_act {act!r}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError("only absolute position embeddings are supported")
    layers = []
    for i in range(dims.layers):
        p = f"encoder.layer.{i}."
        w = {n: (_get(state, p + f"attention.self.{n}.weight"), _get(state, p + f"attention.self.{n}.bias"))
             for n in ("query", "key", "value")}
        ln1 = _ln(state, p + "attention.output.LayerNorm")
        ln2 = _ln(state, p + "output.LayerNorm")
        layers.append(LayerWeights(
            qkv_w=torch.cat([w["query"][0], w["key"][0], w["value"][0]]),
            qkv_b=torch.cat([w["query"][1], w["key"][1], w["value"][1]]),
            attn_out_w=_get(state, p + "attention.output.dense.weight"),
            attn_out_b=_get(state, p + "attention.output.dense.bias"),
            attn_ln_w=ln1[0], attn_ln_b=ln1[1],
            ffn_in_w=_get(state, p + "intermediate.dense.weight"), ffn_in_b=_get(state, p + "intermediate.dense.bias"),
            ffn_out_w=_get(state, p + "output.dense.weight"), ffn_out_b=_get(state, p + "output.dense.bias"),
            ffn_ln_w=ln2[0], ffn_ln_b=ln2[1]))
    eln = _ln(state, "embeddings.LayerNorm")
    pad = int(cfg.get("pad_token_id", 0) or 0)
    roberta_like = mt in ("roberta", "xlm-roberta", "camembert")
    return BaseWeights(
        model_type=mt, dims=dims, eps=float(cfg.get("layer_norm_eps", 1e-12)), activation=ACTIVATIONS[act],
        position_offset=pad + 1 if roberta_like else 0, pad_token_id=pad,
        word_emb=_get(state, "embeddings.word_embeddings.weight"),
        pos_emb=_get(state, "embeddings.position_embeddings.weight"),
        type_emb=state.get("embeddings.token_type_embeddings.weight"),
        emb_ln_w=eln[0], emb_ln_b=eln[1], layers=layers,
        pooler_w=state.get("pooler.dense.weight"), pooler_b=state.get("pooler.dense.bias"), config=cfg)


def _load_distilbert(cfg, state, dims) -> BaseWeights:
    act = cfg.get("activation", "gelu")
    if act not in ACTIVATIONS:
        raise ModelLoadError(f"unsupported activation {act!r}")
    layers = []
    for i in range(dims.layers):
        p = f"transformer.layer.{i}."
        q, k, v = (_get(state, p + f"attention.{n}_lin.weight") for n in "qkv")
        bq, bk, bv = (_get(state, p + f"attention.{n}_lin.bias") for n in "qkv")
        ln1, ln2 = _ln(state, p + "sa_layer_norm"), _ln(state, p + "output_layer_norm")
        layers.append(LayerWeights(
            qkv_w=torch.cat([q, k, v]), qkv_b=torch.cat([bq, bk, bv]),
            attn_out_w=_get(state, p + "attention.out_lin.weight"), attn_out_b=_get(state, p + "attention.out_lin.bias"),
            attn_ln_w=ln1[0], attn_ln_b=ln1[1],
            ffn_in_w=_get(state, p + "ffn.lin1.weight"), ffn_in_b=_get(state, p + "ffn.lin1.bias"),
            ffn_out_w=_get(state, p + "ffn.lin2.weight"), ffn_out_b=_get(state, p + "ffn.lin2.bias"),
            ffn_ln_w=ln2[0], ffn_ln_b=ln2[1]))
    eln = _ln(state, "embeddings.LayerNorm")
    return BaseWeights(
        model_type="distilbert", dims=dims, eps=1e-12, activation=ACTIVATIONS[act], position_offset=0,
        pad_token_id=int(cfg.get("pad_token_id", 0) or 0),
        word_emb=_get(state, "embeddings.word_embeddings.weight"),
        pos_emb=_get(state, "embeddings.position_embeddings.weight"), type_emb=None,
        emb_ln_w=eln[0], emb_ln_b=eln[1], layers=layers, config=cfg)
