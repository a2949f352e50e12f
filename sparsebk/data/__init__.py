"""Data: corpora -> offline tokenisers -> Parquet token blocks -> torch, streaming and Ray Data
loaders.

Names are imported lazily so that `import sparsebk.data` does not pull in pyarrow or Ray.
"""

from __future__ import annotations

from sparsebk._lazy import lazy_exports

_EXPORTS = {
    "prepare_dataset": "sparsebk.data.prepare",
    "load_manifest": "sparsebk.data.manifest",
    "check_dataset": "sparsebk.data.manifest",
    "MANIFEST_NAME": "sparsebk.data.manifest",
    "load_blocks": "sparsebk.data.loading",
    "ray_datasets": "sparsebk.data.loading",
    "stream_rows": "sparsebk.data.stream",
    "SampleOrder": "sparsebk.data.stream",
    "get_tokenizer": "sparsebk.data.tokenizers",
    "load_tokenizer": "sparsebk.data.tokenizers",
    "TOKENIZER_NAMES": "sparsebk.data.tokenizers",
    "Tokenizer": "sparsebk.data.tokenizers",
    "WordTokenizer": "sparsebk.data.tokenizers",
    "ByteTokenizer": "sparsebk.data.tokenizers",
    "GPT2Tokenizer": "sparsebk.data.tokenizers",
    "PTB_TOKENS": "sparsebk.data.corpora",
    "PTB_VOCAB": "sparsebk.data.corpora",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
