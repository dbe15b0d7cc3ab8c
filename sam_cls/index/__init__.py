"""k-NN search over the memory cells: FAISS back-ends (flat, IVF, IVF-PQ, HNSW) and an exact torch one.

build_index picks and builds one, load_index reads a saved one back with checks, recall_at_k measures an
approximate index against exact search, and IndexRefresher keeps an index in step with a changing memory.
"""

from .auto import build_index, choose_kind, load_index
from .base import MemoryIndex
from .params import INDEX_KINDS, IndexParams
from .recall import recall_at_k
from .refresh import IndexRefresher
from .store import IndexMismatchError
from .torch_exact import exact_search

__all__ = [
    "INDEX_KINDS",
    "IndexMismatchError",
    "IndexParams",
    "IndexRefresher",
    "MemoryIndex",
    "build_index",
    "choose_kind",
    "exact_search",
    "load_index",
    "recall_at_k",
]
