from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sam_cls.memory import HUGE_PAGES_MIN_BYTES, MemoryBank, back_with_huge_pages


def test_write_is_a_normalised_momentum_update_of_only_the_batch_cells():
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(10, 4, generator=g), dim=1)
    bank = MemoryBank(emb.clone(), torch.arange(10) % 3)
    u = F.normalize(torch.randn(2, 4, generator=g), dim=1)
    ids = torch.tensor([1, 7])
    bank.write(ids, u, eta=0.25, step=5)
    expected = F.normalize(0.25 * emb[ids] + 0.75 * u, dim=1)
    torch.testing.assert_close(bank.embeddings[ids], expected)
    untouched = torch.tensor([0, 2, 3, 4, 5, 6, 8, 9])
    torch.testing.assert_close(bank.embeddings[untouched], emb[untouched])
    assert bank.last_written.tolist() == [0, 5, 0, 0, 0, 0, 0, 5, 0, 0]


def test_replace_keeps_the_same_storage_for_views():
    bank = MemoryBank(torch.zeros(3, 2), torch.zeros(3))
    view = bank.embeddings
    bank.replace(torch.ones(3, 2), step=2)
    assert view.data_ptr() == bank.embeddings.data_ptr() and view.sum().item() == 6


def test_shape_mismatch_is_a_clear_error():
    try:
        MemoryBank(torch.zeros(3, 2), torch.zeros(4))
    except ValueError as e:
        assert "(3, 2)" in str(e) and "(4,)" in str(e)
    else:
        raise AssertionError("mismatched labels accepted")


def _huge_kib_at(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    kib, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's header line: "start-end perms ..."
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            kib = int(line.split()[1])
    return kib


def test_a_collapsed_memory_keeps_its_values_in_huge_pages():
    cells = F.normalize(torch.randn(64 << 10, 128, generator=torch.Generator().manual_seed(0)), dim=1)  # 32 MiB
    before = cells.clone()
    if not back_with_huge_pages(cells):
        pytest.skip("this kernel has no transparent huge pages to collapse into (Linux 6.1+ MADV_COLLAPSE)")
    assert torch.equal(cells, before)
    assert _huge_kib_at(cells.data_ptr() + cells.numel() * 2) >= 2048  # its middle lies in a huge page


def test_a_tensor_smaller_than_a_huge_page_is_left_alone():
    small = torch.ones(1000, 4)
    assert back_with_huge_pages(small) is False and small.sum().item() == 4000


def test_a_memory_bank_from_the_size_threshold_on_lives_in_huge_pages():
    if not back_with_huge_pages(torch.ones(32 << 18)):  # 32 MiB: can this kernel collapse at all?
        pytest.skip("this kernel has no transparent huge pages to collapse into (Linux 6.1+ MADV_COLLAPSE)")
    n = HUGE_PAGES_MIN_BYTES // (128 * 4)
    bank = MemoryBank(torch.ones(n, 128), torch.zeros(n))
    assert _huge_kib_at(bank.embeddings.data_ptr() + HUGE_PAGES_MIN_BYTES // 2) >= 2048
