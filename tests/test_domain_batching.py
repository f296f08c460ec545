"""domain.batching in process: next_batch narrows a tensor in place along dimension 0, restore puts the
full size back, and where a tensor stands is read from its storage offset alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from weightavg_server.domain import batching
from weightavg_server.domain.errors import InvalidArgument


def walk(t: torch.Tensor, w: int) -> list[tuple[int, int]]:
    """(first row, rows) of every batch next_batch gives, until it returns False."""
    seen = []
    while batching.next_batch(t, w):
        seen.append((batching.position(t), t.shape[0]))
        assert len(seen) <= t.untyped_storage().nbytes()  # a walk that never ends fails here
    return seen


@pytest.mark.parametrize(
    "n, w, batches",
    [
        (250, 100, [(0, 100), (100, 100), (200, 50)]),
        (200, 100, [(0, 100), (100, 100)]),
        (5, 1, [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]),
        (5, 4, [(0, 4), (4, 1)]),
        (7, 3, [(0, 3), (3, 3), (6, 1)]),
    ],
    ids=["reference-example", "exact", "ones", "one-short", "remainder"],
)
def test_next_batch_walks_every_row_once_then_restores(n: int, w: int, batches: list[tuple[int, int]]) -> None:
    t = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    full = t.clone()
    storage = t.untyped_storage().data_ptr()
    assert walk(t, w) == batches
    assert t.shape == (n, 3) and batching.position(t) == 0 and torch.equal(t, full)
    assert t.untyped_storage().data_ptr() == storage  # the same storage throughout, nothing copied
    assert walk(t, w) == batches  # and the next walk starts over


def test_each_batch_holds_its_rows_and_writes_reach_the_full_tensor() -> None:
    t = torch.arange(20).reshape(10, 2)
    full = t.clone()
    assert batching.next_batch(t, 4) and batching.next_batch(t, 4)
    assert torch.equal(t, full[4:8])
    t.mul_(-1)  # the batch is a window on the same storage
    assert batching.restore(t) == 10
    assert torch.equal(t[4:8], -full[4:8]) and torch.equal(t[:4], full[:4]) and torch.equal(t[8:], full[8:])


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_restore_puts_back_the_full_size_from_any_batch(steps: int) -> None:
    t = torch.arange(250.0)
    for _ in range(steps):
        batching.next_batch(t, 100)
    assert batching.restore(t) == 250
    assert t.shape == (250,) and t.storage_offset() == 0 and torch.equal(t, torch.arange(250.0))
    assert batching.full_size(t) == 250


def test_every_handle_to_the_tensor_sees_the_batch() -> None:
    t = torch.arange(12.0).reshape(6, 2)
    alias = t  # e.g. a model's inputs and input(m)
    batching.next_batch(alias, 4)
    batching.next_batch(alias, 4)
    assert t.shape == (2, 2) and batching.position(t) == 4


@pytest.mark.parametrize("w", [0, -1, 10, 11], ids=["zero", "negative", "equal", "larger"])
def test_batch_size_must_be_between_one_and_n_minus_one(w: int) -> None:
    t = torch.zeros(10, 2)
    with pytest.raises(InvalidArgument, match=r"batch: size .* not in the range 1-9 \(tensor size is 10"):
        batching.next_batch(t, w)
    assert t.shape == (10, 2) and t.storage_offset() == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: torch.tensor(3.0), "0-dim"),
        (lambda: torch.zeros(4, 3).t(), "contiguous, non-empty"),
        (lambda: torch.zeros(4, 0), "contiguous, non-empty"),
        (lambda: torch.zeros(10, 3)[:, 1], "contiguous, non-empty"),
        (lambda: torch.zeros(22)[1:21].reshape(10, 2), "view into larger storage"),
        (lambda: torch.zeros(7).reshape(7)[:6].reshape(3, 2)[1:], "view into larger storage"),
    ],
    ids=["0-dim", "transposed", "empty-rows", "column", "offset-view", "row-misaligned"],
)
def test_tensors_that_cannot_be_batched_in_place_are_refused(make: Callable[[], torch.Tensor], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        batching.full_size(make())


def test_seek_narrows_to_a_saved_window_and_position_reads_it_back() -> None:
    t = torch.arange(30.0).reshape(10, 3)
    batching.seek(t, 6, 3)
    assert batching.position(t) == 6 and t.shape == (3, 3)
    assert torch.equal(t, torch.arange(18.0, 27.0).reshape(3, 3))
    assert batching.next_batch(t, 3) and batching.position(t) == 9 and t.shape == (1, 3)
    assert not batching.next_batch(t, 3) and t.shape == (10, 3)


@pytest.mark.parametrize("start, rows", [(-1, 2), (0, 0), (8, 3), (10, 1)])
def test_seek_outside_the_tensor_is_refused(start: int, rows: int) -> None:
    t = torch.arange(10.0)
    with pytest.raises(InvalidArgument, match="do not fit a tensor of 10 rows"):
        batching.seek(t, start, rows)
    assert t.shape == (10,)


def test_check_size_returns_the_full_size_mid_walk() -> None:
    t = torch.zeros(9, 2)
    batching.next_batch(t, 4)
    assert batching.check_size(t, 4) == 9 and t.shape == (4, 2)
