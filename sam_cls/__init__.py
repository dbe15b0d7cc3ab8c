"""sam-cls: a classifier whose weights are mostly memory (a differentiable kNN over a FAISS index)."""

from sam_cls.classifier import MemoryClassifier, load
from sam_cls.fit import fit

__version__ = "0.1.0"
__all__ = ["MemoryClassifier", "__version__", "fit", "load"]
