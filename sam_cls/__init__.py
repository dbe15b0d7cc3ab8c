"""sam-cls: a classifier whose weights are mostly memory (a differentiable kNN over a FAISS index)."""

__version__ = "0.1.0"
