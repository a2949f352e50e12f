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
    "resolvent_diagonal": "sparsebk.bk_core",
    "resolvent_diagonal_reference": "sparsebk.bk_core",
    "resolvent_features": "sparsebk.bk_core",
    # sparsity objectives and the adaptive scheduler (seed spec)
    "sparsity_loss": "sparsebk.sparsity",
    "balanced_sparsity_loss": "sparsebk.sparsity",
    "AdaptiveSparsityScheduler": "sparsebk.scheduler",
    # model
    "GumbelSigmoidGate": "sparsebk.gate",
    "gumbel_sigmoid": "sparsebk.gate",
    "MoEFFN": "sparsebk.moe",
    "SparseBKCore": "sparsebk.layers",
    "SparseMoEResNetBKLayer": "sparsebk.layers",
    "get_sparsity_loss": "sparsebk.layers",
    "get_balanced_loss": "sparsebk.layers",
    "get_sparsity_stats": "sparsebk.layers",
    "LMConfig": "sparsebk.lm",
    "SparseBKLM": "sparsebk.lm",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
