import subprocess
import sys
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


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address` (VmFlags' "hg": huge pages advised)."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):  # a mapping's header line: "start-end perms ..."
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside:
            fields[head.rstrip(":")] = rest.strip()
    return fields


def _collapsed(address: int) -> bool:
    """Advised for huge pages and backed by some: what back_with_huge_pages leaves, whatever the THP mode."""
    fields = _mapping_of(address)
    return "hg" in fields["VmFlags"].split() and int(fields["AnonHugePages"].split()[0]) >= 2048


def _can_collapse() -> bool:
    return back_with_huge_pages(torch.ones(HUGE_PAGES_MIN_BYTES // 4))  # its own mapping, as the bank's


NO_COLLAPSE = "this kernel has no transparent huge pages to collapse into (Linux 6.1+ MADV_COLLAPSE)"


def test_a_collapsed_memory_keeps_its_values_in_huge_pages():
    cells = F.normalize(torch.randn(HUGE_PAGES_MIN_BYTES // 512, 128, generator=torch.Generator().manual_seed(0)),
                        dim=1)
    before = cells.clone()
    assert not _collapsed(cells.data_ptr() + HUGE_PAGES_MIN_BYTES // 2)
    if not back_with_huge_pages(cells):
        pytest.skip(NO_COLLAPSE)
    assert torch.equal(cells, before)
    assert _collapsed(cells.data_ptr() + HUGE_PAGES_MIN_BYTES // 2)


def test_a_tensor_smaller_than_a_huge_page_or_not_contiguous_is_left_alone():
    small = torch.ones(1000, 4)
    assert back_with_huge_pages(small) is False and small.sum().item() == 4000
    assert back_with_huge_pages(torch.zeros(1).expand(1 << 25)) is False  # 4 bytes, though it claims 128 MiB


def test_only_a_memory_bank_from_the_size_threshold_on_lives_in_huge_pages():
    if not _can_collapse():
        pytest.skip(NO_COLLAPSE)
    # In a fresh process: here the allocator may hand the small bank a range an earlier test's large tensor was
    # advised for (its flags outlive the tensor), which says nothing of what MemoryBank did.
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_memory import _collapsed, _mapping_of
from sam_cls.memory import HUGE_PAGES_MIN_BYTES, MemoryBank
n = HUGE_PAGES_MIN_BYTES // (128 * 4)
large = MemoryBank(torch.ones(n, 128), torch.zeros(n))
assert _collapsed(large.embeddings.data_ptr() + HUGE_PAGES_MIN_BYTES // 2)
small = MemoryBank(torch.ones(n // 4, 128), torch.zeros(n // 4))  # 16 MiB: under the threshold
assert "hg" not in _mapping_of(small.embeddings.data_ptr() + (8 << 20))["VmFlags"].split()  # its middle
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reorder_moves_whole_cells_and_writes_still_find_their_example():
    g = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    bank = MemoryBank(emb.clone(), targets)
    view = bank.embeddings
    bank.write(torch.tensor([4]), emb[4:5], eta=0.5, step=3)
    order = torch.tensor([5, 3, 1, 0, 4, 2])
    bank.reorder(order)
    assert view.data_ptr() == bank.embeddings.data_ptr()  # moved in place: an index's view stays valid
    torch.testing.assert_close(bank.embeddings, emb[order])
    assert bank.labels.tolist() == targets[order].tolist() and targets.tolist() == [0, 1, 2, 0, 1, 2]
    assert bank.example_ids.tolist() == order.tolist() and bank.last_written.tolist() == [0, 0, 0, 0, 3, 0]
    assert torch.equal(bank.example_ids[bank.rows], torch.arange(6))
    # Writes name examples: example 1's cell now sits in row 2.
    u = F.normalize(torch.randn(1, 4, generator=g), dim=1)
    bank.write(torch.tensor([1]), u, eta=0.0, step=4)
    torch.testing.assert_close(bank.embeddings[2], u[0])
    # A re-encoded memory arrives in example order and lands in the rows its examples now have.
    bank.replace(emb, step=5)
    torch.testing.assert_close(bank.embeddings, emb[order])


def test_reordered_memory_survives_a_checkpoint_and_a_corrupt_order_is_refused():
    from sam_cls.checkpoint import CheckpointError

    bank = MemoryBank(torch.randn(5, 3), torch.arange(5))
    bank.reorder(torch.tensor([2, 0, 4, 1, 3]))
    again = MemoryBank.from_state_dict(bank.state_dict())
    for name in ("embeddings", "labels", "example_ids", "rows"):
        assert torch.equal(getattr(again, name), getattr(bank, name)), name
    state = bank.state_dict() | {"example_ids": torch.tensor([0, 0, 1, 2, 3])}
    with pytest.raises(CheckpointError, match="example_ids"):
        MemoryBank.from_state_dict(state)
    old = {k: v for k, v in bank.state_dict().items() if k != "example_ids"}  # before layouts existed
    assert torch.equal(MemoryBank.from_state_dict(old).rows, torch.arange(5))
