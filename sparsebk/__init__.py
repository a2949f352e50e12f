"""sparsebk: distributed training on Ray of language models built from sparse BK layers.

Public names are imported lazily, so `import sparsebk` stays cheap (no Ray, no data stack)
and each submodule is loaded the first time one of its names is used.
"""

from __future__ import annotations

from sparsebk._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    # BK-core (exact resolvent diagonal of a tridiagonal operator)
    "resolvent_diagonal": "sparsebk.model.bk_core",
    "resolvent_diagonal_reference": "sparsebk.model.bk_core",
    "resolvent_features": "sparsebk.model.bk_core",
    # sparsity objectives and the adaptive scheduler (seed spec)
    "sparsity_loss": "sparsebk.model.sparsity",
    "balanced_sparsity_loss": "sparsebk.model.sparsity",
    "AdaptiveSparsityScheduler": "sparsebk.scheduler",
    # model
    "GumbelSigmoidGate": "sparsebk.model.gate",
    "gumbel_sigmoid": "sparsebk.model.gate",
    "MoEFFN": "sparsebk.model.moe",
    "SparseBKCore": "sparsebk.model.sparse_bk_core",
    "SparseMoEResNetBKLayer": "sparsebk.model.layers",
    "get_sparsity_loss": "sparsebk.model.layers",
    "get_balanced_loss": "sparsebk.model.layers",
    "get_sparsity_stats": "sparsebk.model.layers",
    "LMConfig": "sparsebk.model.config",
    "SparseBKLM": "sparsebk.model.lm",
    "DecodeState": "sparsebk.model.lm",
    # trained models: an exported folder, or a training checkpoint / run folder
    "load_pretrained": "sparsebk.inference.export",
    "load_checkpoint_model": "sparsebk.inference.export",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
