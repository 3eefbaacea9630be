"""Lower-layer skipping (SkipBERT's PLOT, as vBERT serves it).

A *skipping base* is a derived base model directory: the base's own checkpoint (all layers, for
tenants that adapt the lower layers) plus ``plot.safetensors`` (the shallow part: the lower K
layers run on every 3-token window as its own sequence, a gate, a second position / token-type
embedding and a LayerNorm, distilled to reproduce the full model's layer-K states) and
``plot_table.safetensors`` (the precomputed window states of a corpus's tri-grams).

* ``trigrams``  tri-gram keys and windows from packed token ids (vectorised, on the device);
* ``shallow``   the shallow part's weights and its forward (differentiable, also used to distil);
* ``table``     the device / pinned-host table with a byte budget and LRU;
* ``serve``     what the engine holds: layer-K states of a packed token range from the table;
* ``build``     distillation on an unlabelled corpus and the table of its tri-grams;
* the CLI, ``flockserve base build-plot``, lives in ``workers/cli/base.py`` (the engine imports no CLI).
"""

PLOT_FILE = "plot.safetensors"  # the shallow part, in a skipping base's directory
TABLE_FILE = "plot_table.safetensors"  # the precomputed tri-gram table beside it
