"""What an engine serving a skipping base holds: the shallow part on its device and the table.

``PlotRuntime.lower_states`` gives the layer-K states of a packed token range (the skipping rows
of a plan) from the table, computing missing windows through the shallow layers in the same call.
The engine knows a tenant may skip when every ``layers.{i}.*`` tensor of its delta has i >= K.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from workers.engine.model_loading import BaseWeights
from workers.engine.plot import PLOT_FILE, TABLE_FILE
from workers.engine.plot import trigrams as tg
from workers.engine.plot.shallow import ShallowWeights, assemble, window_states
from workers.engine.plot.table import PlotTable

def plot_skip(model_dir: str) -> int | None:
    """K of a skipping base directory, or None for a plain base."""
    p = os.path.join(model_dir, PLOT_FILE)
    if not os.path.exists(p):
        return None
    with safe_open(p, "pt") as f:
        return int(json.loads(f.metadata()["flock_plot"])["skip"])


class PlotRuntime:
    def __init__(self, model_dir: str, base: BaseWeights, device: torch.device, dtype: torch.dtype,
                 device_bytes: int = 1 << 30, host_bytes: int = 4 << 30, load_table: bool = True,
                 insert_rows: int = 8192):
        path = os.path.join(model_dir, PLOT_FILE)
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["flock_plot"])
        self.skip = int(meta["skip"])
        self.meta = meta
        self.base = base  # the engine's (device, dtype) weights: embeddings shared with the full path
        self.shallow = ShallowWeights.from_tensors(load_file(path), self.skip).to(device, dtype)
        self.vocab = base.word_emb.shape[0]
        self.table = PlotTable(base.dims.hidden, device, dtype, device_bytes, host_bytes, insert_rows)
        tp = os.path.join(model_dir, TABLE_FILE)
        self.loaded = 0
        if load_table and os.path.exists(tp):
            t = load_file(tp)
            self.loaded = self.table.load(t["keys"], t["values"])

    def compute(self, keys: torch.Tensor) -> torch.Tensor:
        """[m, 3, h] window states of keys, through the shallow layers."""
        return window_states(self.base, self.shallow, tg.unkey(keys, self.vocab))

    def lower_states(self, ids: torch.Tensor, token_type: torch.Tensor | None, local_pos: torch.Tensor,
                     has_prev: torch.Tensor, has_next: torch.Tensor, use_table: bool = True) -> torch.Tensor:
        """Layer-K states [T, h] of packed tokens (whole sequences). ``use_table=False`` computes
        every window (the reference the tests compare the table against)."""
        win = tg.windows(ids, has_prev, has_next)
        k = tg.keys(win, self.vocab)
        uniq, inv = torch.unique(k, return_inverse=True)
        vals = self.table.get(uniq, self.compute) if use_table else self.compute(uniq)
        tri = vals.index_select(0, inv)
        return assemble(tri, has_prev, has_next, local_pos, token_type, self.shallow, self.base.eps)

    def plan_states(self, plan, t0: int) -> torch.Tensor:
        """Layer-K states of a plan's tokens [t0, T) (the skipping sequences, sorted last)."""
        pos = plan.local_pos[t0:]
        has_prev, has_next = tg.neighbours(plan.cu64, plan.tok_seq, plan.local_pos)
        tt = plan.token_type_ids[t0:] if plan.token_type_ids is not None else None
        return self.lower_states(plan.input_ids[t0:], tt, pos, has_prev[t0:], has_next[t0:])

    def report(self) -> dict:
        return {"skip": self.skip, "loaded_rows": self.loaded, **self.table.report()}
