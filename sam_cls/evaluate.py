"""Classifying with the memory: encode, find K cells, read them; shared by training and the CLI."""

from collections.abc import Callable

import torch
from tqdm import tqdm

from sam_cls.memory import MemoryBank
from sam_cls.model import Encoder
from sam_cls.read import dense_read, sparse_read


@torch.no_grad()
def encode_all(encoder: Encoder, images: torch.Tensor, batch_size: int, desc: str = "encode",
               fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Embeddings (or `fn`'s output, e.g. encoder.logits) of every image in eval mode, on the encoder's device."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    fn = fn or encoder
    chunks = [
        fn(images[i : i + batch_size].to(device))
        for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, unit="batch")
    ]
    encoder.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def classify(u: torch.Tensor, memory: MemoryBank, index, topk: int, num_classes: int, temperature: float):
    """Class log-probabilities and the memory rows read (None for the dense read); examples: memory.example_ids[rows]."""
    if topk == 0 or index is None:
        return dense_read(u, memory.embeddings, memory.labels, num_classes, temperature), None
    _, ids = index.search(u, topk)
    ids = ids.to(memory.embeddings.device)
    return sparse_read(u, ids, memory.embeddings, memory.labels, num_classes, temperature), ids


@torch.no_grad()
def accuracy(
    encoder: Encoder,
    images: torch.Tensor,
    labels: torch.Tensor,
    memory: MemoryBank,
    index,
    topk: int,
    num_classes: int,
    temperature: float,
    batch_size: int = 1024,
) -> float:
    """Percent of `images` whose most probable class under the memory read is their label."""
    u = encode_all(encoder, images, batch_size, desc="test")
    correct = 0
    for i in range(0, len(u), batch_size):
        log_probs, _ = classify(u[i : i + batch_size], memory, index, topk, num_classes, temperature)
        correct += (log_probs.argmax(1).cpu() == labels[i : i + batch_size].cpu()).sum().item()
    return 100.0 * correct / len(labels)


@torch.no_grad()
def head_accuracy(encoder: Encoder, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Percent correct of the softmax head (the parametric baseline)."""
    logits = encode_all(encoder, images, batch_size, desc="test", fn=encoder.logits)
    return 100.0 * (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()
