"""Using a trained run: reload its encoder, memory and index to evaluate, rebuild or inspect them."""

import time
from dataclasses import dataclass

import torch

from sam_cls.checkpoint import CheckpointError, RunDir, atomic_save, load_tensors
from sam_cls.config import Config, ConfigError
from sam_cls.data import Dataset
from sam_cls.evaluate import accuracy, encode_all
from sam_cls.index import IndexParams, build_index, load_index, recall_at_k
from sam_cls.memory import MemoryBank
from sam_cls.model import Encoder
from sam_cls.train import get_dataset, index_params, make_encoder, resolve_device


@dataclass
class LoadedRun:
    run: RunDir
    cfg: Config
    data: Dataset
    encoder: Encoder
    state: dict  # the checkpoint: the memory lives in it, so encoder and memory always come from one epoch
    device: torch.device

    def memory(self) -> MemoryBank:
        memory = MemoryBank.from_state_dict(self.state["memory"], self.device)
        if memory.size != len(self.data.train_y) or memory.dim != self.cfg.dim:
            raise CheckpointError(f"{self.run.checkpoint} holds {memory.size} x {memory.dim} cells but the data set "
                                  f"gives {len(self.data.train_y)} x {self.cfg.dim}: check --data-dir")
        return memory

    def index(self, memory: MemoryBank, params: IndexParams | None = None):
        return load_index(self.run.index, params, expect_dim=memory.dim, expect_size=memory.size)


def load_run(path: str, data_dir: str | None = None, device: str = "auto", log=print) -> LoadedRun:
    """Config, data, encoder weights and memory of a finished run (weights_only loading: no code runs)."""
    run = RunDir(path)
    run.require_checkpoint()
    cfg = run.load_config(**({"data_dir": data_dir} if data_dir else {}))
    dev = resolve_device(device)
    data = get_dataset(cfg, log)
    encoder = make_encoder(cfg, data)
    state = load_tensors(run.checkpoint, dev)
    try:
        encoder.load_state_dict(state["encoder"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{run.checkpoint} does not match encoder {cfg.encoder!r} with dim {cfg.dim}: {e}") from e
    return LoadedRun(run, cfg, data, encoder.to(dev).eval(), state, dev)


def evaluate_run(loaded: LoadedRun, topk: int | None = None) -> dict:
    """Test accuracy of the memory classifier (for a softmax-head run too: kNN over its embeddings)."""
    cfg = loaded.cfg
    topk = cfg.topk if topk is None else topk
    memory = loaded.memory()
    if not 0 <= topk <= memory.size:
        raise ConfigError(f"--topk {topk} must be between 0 and the memory's {memory.size} cells")
    index = loaded.index(memory, index_params(cfg, loaded.device)) if topk else None
    acc = accuracy(loaded.encoder, loaded.data.test_x, loaded.data.test_y, memory, index, topk,
                   loaded.data.num_classes, cfg.temperature, cfg.eval_batch_size)
    return {"accuracy": round(acc, 3), "topk": topk, "n": len(loaded.data.test_y)}


def rebuild_run_index(loaded: LoadedRun, params: IndexParams, log=print) -> dict:
    """Re-encode the support set, rebuild the index (any kind) and save both into the run."""
    cfg = loaded.cfg
    embeddings = encode_all(loaded.encoder, loaded.data.train_x.to(loaded.device), cfg.eval_batch_size, desc="memory")
    k = max(cfg.topk, 1)
    start = time.perf_counter()
    index = build_index(embeddings, params, k=k, log=log)
    build_seconds = time.perf_counter() - start
    queries = embeddings[torch.randperm(len(embeddings), generator=torch.Generator().manual_seed(0))[:256]]
    recall = recall_at_k(index, embeddings, queries, k)
    index.save(loaded.run.index)
    memory = MemoryBank(embeddings, loaded.data.train_y.to(embeddings.device))
    memory.last_written.fill_(loaded.state["step"])
    loaded.state["memory"] = {name: t.cpu() for name, t in memory.state_dict().items()}
    atomic_save(loaded.state, loaded.run.checkpoint)
    return {"ntotal": index.size, "dim": index.dim, "index": index.kind, "build_seconds": round(build_seconds, 3),
            "recall_at_k": round(recall["recall_at_k"], 4), "k": k}


def index_stats(loaded: LoadedRun, topk: int | None = None, queries: int = 1000) -> dict:
    """Recall@K of the run's saved index against exact search, on queries from the run's test images."""
    memory = loaded.memory()
    index = loaded.index(memory, index_params(loaded.cfg, loaded.device))
    k = min(topk or max(loaded.cfg.topk, 1), memory.size)
    q = encode_all(loaded.encoder, loaded.data.test_x[:queries].to(loaded.device), loaded.cfg.eval_batch_size)
    stats = recall_at_k(index, memory.embeddings, q, k)
    return {"index": index.kind, "description": index.description, "ntotal": index.size, "dim": index.dim, **stats}
