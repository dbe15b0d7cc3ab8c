import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sam_cls import read
from sam_cls.memory import MemoryBank
from sam_cls.read import dense_read, exclusion_mask, sparse_read


def make(n=60, d=8, b=5, c=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    memory = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    u = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1).requires_grad_()
    return u, memory, labels


def test_sparse_with_all_cells_equals_dense_values_and_gradients():
    u, memory, labels = make()
    ids = torch.arange(len(memory)).expand(u.shape[0], -1)
    target = torch.tensor([0, 1, 2, 3, 0])
    sparse = sparse_read(u, ids, memory, labels, 4, 0.1)
    (g_sparse,) = torch.autograd.grad(F.nll_loss(sparse, target), u)
    dense = dense_read(u, memory, labels, 4, 0.1, chunk=7)  # chunk not dividing N exercises the tail
    (g_dense,) = torch.autograd.grad(F.nll_loss(dense, target), u)
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(g_sparse, g_dense)


def test_exclusion_matches_between_sparse_and_dense():
    u, memory, labels = make()
    own = torch.tensor([3, 10, 59, 0, 17])
    ids = torch.arange(len(memory)).expand(u.shape[0], -1)
    sparse = sparse_read(u, ids, memory, labels, 4, 0.2, exclude=ids == own.unsqueeze(1))
    dense = dense_read(u, memory, labels, 4, 0.2, exclude_ids=own, chunk=16)
    torch.testing.assert_close(sparse, dense)
    # A query's excluded cell must not matter to it: moving that cell changes nothing.
    moved = memory.clone()
    moved[own[0]] = -moved[own[0]]
    again = dense_read(u[:1], moved, labels, 4, 0.2, exclude_ids=own[:1], chunk=16)
    torch.testing.assert_close(dense[:1], again)


def test_dense_read_gradcheck_float64():
    u, memory, labels = make(n=23, d=5, b=3, c=3)
    own = torch.tensor([0, 5, 22])
    weights = torch.randn(3, 3, dtype=torch.float64)  # a generic upstream gradient, not only NLL's
    assert torch.autograd.gradcheck(
        lambda x: (dense_read(x, memory, labels, 3, 0.3, exclude_ids=own, chunk=4) * weights).sum(), (u,)
    )


def test_sparse_read_gradcheck_float64():
    u, memory, labels = make(n=23, d=5, b=3, c=4)
    labels[labels == 3] = 0  # class 3 is in no row's candidates: its floored log-probability passes no gradient
    ids = torch.randint(0, 23, (3, 6), generator=torch.Generator().manual_seed(1))
    exclude = exclusion_mask(ids, torch.tensor([ids[0, 2].item(), 22, ids[2, 0].item()]))
    weights = torch.randn(3, 4, dtype=torch.float64)  # a generic upstream gradient, not only NLL's
    assert torch.autograd.gradcheck(
        lambda x: (sparse_read(x, ids, memory, labels, 4, 0.3, exclude=exclude) * weights).sum(), (u,)
    )


def test_log_probs_are_normalised_and_match_a_direct_softmax():
    u, memory, labels = make(dtype=torch.float32)
    log_probs = dense_read(u, memory, labels, 4, 0.05, chunk=9)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(u.shape[0]))
    p = torch.softmax(u @ memory.T / 0.05, dim=1)
    direct = (p @ F.one_hot(labels, 4).float()).log()
    torch.testing.assert_close(log_probs, direct, rtol=1e-4, atol=1e-5)


def test_exclusion_mask_keeps_exactly_k():
    ids = torch.tensor([[4, 2, 9], [1, 7, 3]])
    mask = exclusion_mask(ids, torch.tensor([2, 8]))
    assert mask.tolist() == [[False, True, False], [False, False, True]]
    assert (mask.sum(1) == 1).all()


def test_dense_read_survives_a_chunk_holding_only_the_excluded_cell():
    u, memory, labels = make(n=10, b=2)
    own = torch.tensor([0, 9])
    one_cell_chunks = dense_read(u, memory, labels, 4, 0.1, exclude_ids=own, chunk=1)
    torch.testing.assert_close(one_cell_chunks, dense_read(u, memory, labels, 4, 0.1, exclude_ids=own, chunk=64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_candidate_scores_are_the_gathered_products_in_search_order(dtype):
    u, memory, _ = make(b=5, dtype=dtype)
    # Unsorted ids with a repeat: the order a search returns, which the scores must keep.
    ids = torch.randint(0, len(memory), (5, 7), generator=torch.Generator().manual_seed(2))
    ids[0] = torch.tensor([9, 3, 3, 0, len(memory) - 1, 5, 1])
    direct = (memory[ids] * u.detach().unsqueeze(1)).sum(-1)
    torch.testing.assert_close(read.candidate_scores(u.detach(), ids, memory), direct)


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_candidate_scores_refuse_ids_outside_the_memory(bad):
    u, memory, _ = make(b=2)
    ids = torch.zeros(2, 3, dtype=torch.long)
    ids[1, 2] = bad
    with pytest.raises(IndexError, match=f"cell ids must lie in \\[0, {len(memory)}\\)"):
        read.candidate_scores(u.detach(), ids, memory)


def test_sparse_read_backward_refuses_a_memory_written_since_its_forward():
    u, memory, labels = make(dtype=torch.float32)
    bank = MemoryBank(memory, labels)
    ids = torch.randint(0, len(memory), (u.shape[0], 6), generator=torch.Generator().manual_seed(3))
    log_probs = sparse_read(u, ids, bank.embeddings, bank.labels, 4, 0.1)
    bank.write(ids[:, 0], u, 0.5, step=1)  # the gradient would use cells the forward never saw
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        log_probs.sum().backward()


def test_reads_leave_other_warnings_shown_once():
    # Filtering warnings around each read would reset Python's "shown once" records, so a warning that a
    # training step raises each time would print every step instead of once.
    script = (
        "import warnings, torch\n"
        "from sam_cls.read import candidate_scores\n"
        "memory, u = torch.randn(10, 4), torch.randn(2, 4)\n"
        "for _ in range(3):\n"
        "    candidate_scores(u, torch.randint(0, 10, (2, 3)), memory)\n"
        "    warnings.warn('a step warning')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stderr.count("a step warning") == 1, result.stderr
