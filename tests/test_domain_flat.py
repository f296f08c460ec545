"""Flat parameters and dictionaries (domain.flat) and the fused averaging path over them.

The fused path must give exactly (bit for bit) what the per-tensor path gives, since every kernel
involved is elementwise; both are also checked against torch.optim.swa_utils.AveragedModel. The
per-tensor side of each comparison is built the old way: a module whose parameters are separate
allocations and a dictionary of separate copies, so nothing there can fuse.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections import OrderedDict

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from weightavg_server.domain import averaging, dictionaries, flat, modules
from weightavg_server.domain.averaging import BufferMode
from weightavg_server.domain.dictionaries import COUNT_KEY, TensorDict
from weightavg_server.domain.moves import move
from weightavg_server.domain.tensors import held_bytes


def make_net() -> torch.nn.Module:
    """Linears of several shapes, a batchnorm (float running statistics, an int64 count), a
    bias-free layer: parameters and buffers interleave in registration order."""
    return torch.nn.Sequential(OrderedDict(
        a=torch.nn.Linear(7, 6), b=torch.nn.BatchNorm1d(6), r=torch.nn.ReLU(),
        c=torch.nn.Linear(6, 5, bias=False), d=torch.nn.Linear(5, 3),
    ))


def twins(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same network twice: built flat, and built the usual way (separate allocations)."""
    torch.manual_seed(seed)
    flat_net = flat.build_flat(make_net)
    torch.manual_seed(seed)
    plain = make_net()
    return flat_net, plain


def plain_copy(module: torch.nn.Module, dtype: torch.dtype | None = None, buffers: bool = False) -> TensorDict:
    """copy_parameters as it was before flat dictionaries: one allocation per entry."""
    return TensorDict({
        name: t.detach().to(dtype=averaging.copy_dtype(t, dtype), copy=True)
        for name, t in averaging.copied_tensors(module, buffers)
    })


def perturb(*nets: torch.nn.Module, seed: int) -> None:
    """The same change to each net's parameters and floating buffers (a training step's stand-in)."""
    for net in nets:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for t in [*net.parameters(), *net.buffers()]:
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=g).to(t.dtype))
                else:
                    t.add_(1)


def assert_identical(a: TensorDict, b: TensorDict) -> None:
    assert list(a.entries) == list(b.entries)
    for name in a.entries:
        assert a.entries[name].dtype == b.entries[name].dtype, name
        assert torch.equal(a.entries[name], b.entries[name]), name


def storage_of(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# -- layouts -------------------------------------------------------------------------------------------


def test_a_flat_build_gives_the_same_values_in_one_buffer_per_dtype() -> None:
    flat_net, plain = twins()
    params = list(flat_net.parameters())
    assert flat.is_flat(params)
    assert len({storage_of(p) for p in params}) == 1
    assert not flat.is_flat(list(plain.parameters()))
    for (n1, p1), (n2, p2) in zip(flat_net.named_parameters(), plain.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and type(p1) is torch.nn.Parameter and p1.requires_grad
    for b1, b2 in zip(flat_net.buffers(), plain.buffers()):
        assert torch.equal(b1, b2)


def test_the_meta_sizing_pass_draws_no_random_numbers() -> None:
    torch.manual_seed(5)
    flat.build_flat(make_net)
    after_flat = torch.rand(4)
    torch.manual_seed(5)
    make_net()
    assert torch.equal(after_flat, torch.rand(4))


def test_copy_parameters_is_flat_per_dtype_and_holds_exactly_its_bytes() -> None:
    net, _ = twins()
    d = averaging.copy_parameters(net, torch.float64, buffers=True)
    floating = [t for t in d.entries.values() if t.is_floating_point()]
    assert flat.is_flat(floating) and all(t.dtype == torch.float64 for t in floating)
    assert d.entries["b.num_batches_tracked"].dtype == torch.int64
    expected = sum(t.numel() * (8 if t.is_floating_point() else t.element_size()) for _, t in
                   averaging.copied_tensors(net, True))
    assert held_bytes(d) == {"cpu": expected}


def test_a_module_move_lays_the_moved_parameters_back_to_back_and_keeps_the_parameter_objects() -> None:
    net, plain = twins()
    before = list(net.parameters())
    view = modules.view_parameters(net)
    move(net, None, torch.bfloat16)
    move(plain, None, torch.bfloat16)
    after = list(net.parameters())
    assert all(a is b for a, b in zip(before, after))  # optimizers and views keep working
    assert flat.is_flat(after) and after[0].dtype == torch.bfloat16
    assert all(view.entries[n] is p for n, p in net.named_parameters())
    for p1, p2 in zip(net.parameters(), plain.parameters()):
        assert torch.equal(p1, p2)
    move(plain, None, torch.float32)
    assert flat.is_flat(list(plain.parameters()))  # a move flattens a module built the usual way too


def test_a_dictionary_move_is_flat_and_leaves_the_count_a_cpu_float64() -> None:
    net, _ = twins()
    d = plain_copy(net)
    d.entries[COUNT_KEY] = torch.tensor(3.0, dtype=torch.float64)
    move(d, None, torch.float16)
    tensors = [t for n, t in d.entries.items() if n != COUNT_KEY]
    assert flat.is_flat(tensors) and tensors[0].dtype == torch.float16
    assert d.entries[COUNT_KEY].dtype == torch.float64


# -- the fused path against the per-tensor path and torch ------------------------------------------------


def test_running_average_flat_equals_per_tensor_bit_for_bit_and_matches_averaged_model() -> None:
    flat_net, plain = twins()
    fd, pd = averaging.copy_parameters(flat_net), plain_copy(plain)
    oracle = AveragedModel(plain)
    oracle.update_parameters(plain)  # its first update copies, as copy_parameters did
    update = averaging.prepare_average(flat_net, fd)
    assert len(update.averaged) == 1  # every parameter in one span pair: one kernel
    assert len(averaging.prepare_average(plain, pd).averaged) == len(list(plain.parameters()))
    for step in range(1, 6):
        perturb(flat_net, plain, seed=step)
        assert averaging.average_parameters(flat_net, fd) == averaging.average_parameters(plain, pd) == step + 1
        oracle.update_parameters(plain)
        assert_identical(fd, pd)
    for name, p in oracle.module.named_parameters():
        # AveragedModel divides (p - avg) by n + 1, lerp multiplies by 1 / (n + 1): a few ulps apart
        torch.testing.assert_close(fd.entries[name], p.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", [BufferMode.AVERAGE, BufferMode.COPY])
def test_buffer_modes_flat_equal_per_tensor(mode: BufferMode) -> None:
    flat_net, plain = twins(1)
    fd, pd = averaging.copy_parameters(flat_net, buffers=True), plain_copy(plain, buffers=True)
    for step in range(1, 4):
        perturb(flat_net, plain, seed=step)
        averaging.average_parameters(flat_net, fd, mode)
        averaging.average_parameters(plain, pd, mode)
        assert_identical(fd, pd)
    assert fd.entries["b.num_batches_tracked"].item() == 3  # integers copied, never averaged


def test_a_bfloat16_module_into_a_float32_average_casts_in_pieces_with_the_same_result() -> None:
    """Parameters bigger than CAST_CHUNK, so the cast goes piece by piece inside one span."""
    def big() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(600, 500), torch.nn.Linear(500, 7))

    torch.manual_seed(2)
    flat_net = flat.build_flat(big)
    torch.manual_seed(2)
    plain = big()
    move(flat_net, None, torch.bfloat16)
    plain.to(torch.bfloat16)
    fd, pd = averaging.copy_parameters(flat_net, torch.float32), plain_copy(plain, torch.float32)
    update = averaging.prepare_average(flat_net, fd)
    assert len(update.averaged) == 1
    assert update.cast_bytes() == {"cpu": averaging.CAST_CHUNK * 4}  # one piece in float32, not the span
    for step in range(1, 4):
        perturb(flat_net, plain, seed=step)
        averaging.average_parameters(flat_net, fd)
        averaging.ema_update(flat_net, fd, step=10**6)
        averaging.average_parameters(plain, pd)
        averaging.ema_update(plain, pd, step=10**6)
        assert_identical(fd, pd)
    # and against the cast-then-lerp a user writes: a.lerp_(p.float(), w)
    ref = {n: t.clone() for n, t in fd.entries.items() if n != COUNT_KEY}
    perturb(flat_net, seed=9)
    averaging.ema_update(flat_net, fd, step=10**6)
    w = 1.0 - 0.9999
    for name, p in flat_net.named_parameters():
        assert torch.equal(fd.entries[name], ref[name].lerp_(p.detach().float(), w))


def test_a_cast_off_the_cpu_goes_in_larger_pieces_and_is_reserved_as_such() -> None:
    """On CUDA a piece costs two kernel launches, so pieces there are DEVICE_CAST_CHUNK elements
    (about 9x faster on an H200 for a 25.6M span); the reservation follows. Meta tensors stand for
    a device that is not the CPU: the plan and its bytes are worked out without running anything."""
    numel = 2 * averaging.DEVICE_CAST_CHUNK + 3
    net = torch.nn.Linear(numel, 1, bias=False, device="meta", dtype=torch.bfloat16)
    d = TensorDict({"weight": torch.empty(1, numel, device="meta")})
    update = averaging.prepare_average(net, d)
    assert update.cast_bytes() == {"meta": averaging.DEVICE_CAST_CHUNK * 4}
    small = torch.nn.Linear(averaging.DEVICE_CAST_CHUNK // 2, 1, bias=False, device="meta", dtype=torch.bfloat16)
    whole = averaging.prepare_average(small, TensorDict({"weight": torch.empty(1, averaging.DEVICE_CAST_CHUNK // 2, device="meta")}))
    assert whole.cast_bytes() == {"meta": averaging.DEVICE_CAST_CHUNK // 2 * 4}  # one piece: the whole value
    cpu = torch.empty(averaging.CAST_CHUNK + 1)
    assert averaging.cast_chunk(cpu) == averaging.CAST_CHUNK < averaging.cast_chunk(net.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_bfloat16_module_into_a_float32_average_on_cuda_casts_in_device_pieces_with_the_cast_then_lerp_bits() -> None:
    net = flat.build_flat(lambda: torch.nn.Sequential(torch.nn.Linear(3000, 1500), torch.nn.Linear(1500, 7)))
    move(net, torch.device("cuda"), torch.bfloat16)
    d = averaging.copy_parameters(net, torch.float32)
    update = averaging.prepare_ema(net, d, step=10**6)
    assert update.cast_bytes() == {"cuda:0": averaging.DEVICE_CAST_CHUNK * 4}  # 4.5M elements: two pieces
    ref = {n: t.clone() for n, t in d.entries.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    averaging.ema_update(net, d, step=10**6)
    w = 1.0 - 0.9999
    for name, p in net.named_parameters():
        assert torch.equal(d.entries[name], ref[name].lerp_(p.detach().float(), w)), name


def test_ema_flat_equals_per_tensor_and_torch_ema() -> None:
    flat_net, plain = twins(3)
    fd, pd = averaging.copy_parameters(flat_net), plain_copy(plain)
    decay = 0.9
    oracle = AveragedModel(plain, multi_avg_fn=get_ema_multi_avg_fn(decay))
    oracle.update_parameters(plain)
    for step in range(1, 5):
        perturb(flat_net, plain, seed=step)
        for net, d in ((flat_net, fd), (plain, pd)):
            averaging.ema_update(net, d, averaging.ScheduleChange(decay=decay), step=step + 1)
        oracle.update_parameters(plain)
        assert_identical(fd, pd)
    for name, p in oracle.module.named_parameters():
        torch.testing.assert_close(fd.entries[name], p.detach(), rtol=1e-6, atol=1e-6)


def test_a_dictionary_source_fuses_too() -> None:
    flat_net, plain = twins(4)
    fd, pd = averaging.copy_parameters(flat_net), plain_copy(plain)
    perturb(flat_net, plain, seed=1)
    fsrc, psrc = averaging.copy_parameters(flat_net), plain_copy(plain)
    assert len(averaging.prepare_average(fsrc, fd).averaged) == 1
    averaging.average_parameters(fsrc, fd)
    averaging.average_parameters(psrc, pd)
    assert_identical(fd, pd)


# -- the cached plan: every change of either side is seen ---------------------------------------------------


def test_a_replaced_entry_is_averaged_in_its_new_tensor_not_the_old_view() -> None:
    net, _ = twins()
    d = averaging.copy_parameters(net)
    averaging.average_parameters(net, d)  # a plan is cached
    old = d.entries["a.weight"]
    dictionaries.set_entries(d, [("a.weight", torch.zeros(6, 7))], torch.device("cpu"))
    kept = old.clone()
    averaging.average_parameters(net, d)
    assert torch.equal(old, kept)  # the replaced view is not written any more
    # n was 2: the new entry (zeros) moves a third of the way to the weight
    torch.testing.assert_close(d.entries["a.weight"], net.a.weight.detach() / 3)


def test_a_new_entry_and_a_deleted_one_change_the_plan() -> None:
    net, _ = twins()
    d = averaging.copy_parameters(net)
    averaging.average_parameters(net, d)
    dictionaries.delete_entries(d, ["d.bias"])
    with pytest.raises(averaging.InvalidArgument, match="d.bias"):
        averaging.average_parameters(net, d)
    dictionaries.set_entries(d, [("d.bias", net.d.bias.detach().clone())], torch.device("cpu"))
    assert averaging.average_parameters(net, d) == 3


def test_a_registered_parameter_joins_the_average() -> None:
    net, _ = twins()
    d = averaging.copy_parameters(net)
    averaging.average_parameters(net, d)
    modules.set_parameter(net, "extra", torch.ones(4))
    with pytest.raises(averaging.InvalidArgument, match="extra"):
        averaging.average_parameters(net, d)
    dictionaries.set_entries(d, [("extra", torch.zeros(4))], torch.device("cpu"))
    averaging.average_parameters(net, d)
    torch.testing.assert_close(d.entries["extra"], torch.full((4,), 1 / 3))


def test_a_parameter_whose_data_is_replaced_outside_a_move_is_seen() -> None:
    net, _ = twins()
    d = averaging.copy_parameters(net)
    averaging.average_parameters(net, d)
    with torch.no_grad():
        net.c.weight.data = torch.full_like(net.c.weight, 3.0)  # a separate storage: the run splits
    expected = d.entries["c.weight"].lerp(torch.full_like(net.c.weight, 3.0), 1 / 3)
    averaging.average_parameters(net, d)
    assert torch.equal(d.entries["c.weight"], expected)


def test_a_moved_module_is_averaged_at_its_new_dtype() -> None:
    net, _ = twins()
    d = averaging.copy_parameters(net)
    averaging.average_parameters(net, d)
    move(net, None, torch.float64)
    update = averaging.prepare_average(net, d)
    assert update.averaged[0][1].dtype == torch.float64 and len(update.averaged) == 1
    averaging.apply(update, d)
    assert d.entries["a.weight"].dtype == torch.float32


def test_a_data_swap_ends_every_plan_even_where_the_addresses_come_back() -> None:
    """A move swaps a module's data in place and calls `flat.forget`. A live view of the module is
    a dictionary whose version the move does not change, and a new storage may land where a freed
    one was, so every address can match the plan's. The plan must end anyway: here the swap keeps
    the addresses on purpose (the same memory seen as float64), and the next average is checked
    afresh instead of running the old plan's float32 kernel calls."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 8)
    view = modules.view_parameters(net)
    d = averaging.copy_parameters(net)
    averaging.average_parameters(view, d)  # a plan for (view, d) is cached
    with torch.no_grad():
        for p in net.parameters():
            p.data = p.data.view(torch.float64)  # same addresses, new dtype and shape
    flat.forget(net)
    with pytest.raises(averaging.InvalidArgument, match="weight"):
        averaging.average_parameters(view, d)


def test_a_plan_keeps_nothing_alive() -> None:
    net, _ = twins()
    d = averaging.copy_parameters(net)
    averaging.average_parameters(net, d)
    assert d.plans
    param = weakref.ref(net.a.weight)
    del net
    gc.collect()
    assert param() is None
    with pytest.raises(averaging.InvalidArgument):  # and a new source of the same id is planned afresh
        averaging.average_parameters(torch.nn.Linear(2, 2), d)


def test_a_refused_call_after_a_cached_one_changes_nothing() -> None:
    net, _ = twins()
    d = averaging.copy_parameters(net)
    averaging.average_parameters(net, d)
    d.entries[COUNT_KEY] = torch.tensor(-1.0, dtype=torch.float64)
    before = {n: t.clone() for n, t in d.entries.items()}
    with pytest.raises(averaging.InvalidArgument, match="count"):
        averaging.average_parameters(net, d)
    for n, t in d.entries.items():
        assert torch.equal(t, before[n])


# -- training and accounting ------------------------------------------------------------------------------


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
    lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True),
])
def test_an_optimizer_keeps_training_a_module_flattened_under_it(make_optimizer: object) -> None:
    """The plain twin is flattened after three steps, with momentum and Adam's moments already in
    the optimizer's state: the Parameter objects stay, so the optimizer goes on as before."""
    flat_net, plain = twins(6)
    x, y = torch.randn(16, 7, generator=torch.Generator().manual_seed(0)), torch.randint(0, 3, (16,))
    results = []
    for net in (flat_net, plain):
        opt = make_optimizer(list(net.parameters()))  # type: ignore[operator]
        for i in range(6):
            if i == 3:
                flat.flatten_parameters(net)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        assert flat.is_flat(list(net.parameters()))
        results.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*results):
        # unaligned views may split a matmul's vector lanes differently: equal up to rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_flat_dictionary_is_charged_its_whole_buffer_while_any_entry_lives() -> None:
    net, _ = twins()
    d = averaging.copy_parameters(net)
    whole = sum(p.numel() * 4 for p in net.parameters())
    assert held_bytes(d) == {"cpu": whole}
    dictionaries.delete_entries(d, ["a.weight", "a.bias", "b.weight", "b.bias", "c.weight"])
    assert held_bytes(d) == {"cpu": whole}  # the buffer is alive through d.weight and d.bias
    dictionaries.set_entries(d, [("d.weight", torch.zeros(3, 5))], torch.device("cpu"))
    assert held_bytes(d) == {"cpu": whole + 3 * 5 * 4}
    dictionaries.delete_entries(d, ["d.bias"])
    assert held_bytes(d) == {"cpu": 3 * 5 * 4}  # the last view went: the buffer is freed and uncharged


# -- merging across flat dictionaries ------------------------------------------------------------------


def flat_dicts(count: int) -> list[TensorDict]:
    """Dictionaries whose floating entries are slices of one buffer each, and an int64 counter."""
    out = []
    for k in range(count):
        g = torch.Generator().manual_seed(k)
        values = [torch.randn(6, 5, generator=g), torch.randn(6, generator=g), torch.randn(3, 6, generator=g)]
        a_w, a_b, c_w = flat.flat_copies(values)
        out.append(TensorDict({"a.weight": a_w, "a.bias": a_b, "c.weight": c_w, "n": torch.tensor(k * 3 + 1)}))
    return out


def test_average_into_one_of_its_flat_inputs_is_not_mistaken_for_aliasing() -> None:
    """The entries of a flat dictionary share a storage but not bytes: merging into it must judge
    aliasing by the bytes each entry spans, not by where its storage starts."""
    from weightavg_server.domain import merging

    ds = flat_dicts(3)
    want = {n: (ds[0].entries[n] + 2 * ds[1].entries[n] + ds[2].entries[n]) / 4 for n in ("a.weight", "a.bias", "c.weight")}
    target = ds[1]
    plan = merging.plan(merging.METHODS["average"], ds, weights=[1.0, 2.0, 1.0], into=target,
                        kwargs=[("integers", "max")])
    merging.run(plan, ds, into=target)
    for name, value in want.items():
        torch.testing.assert_close(target.entries[name], value)
    assert target.entries["n"].item() == 7  # the maximum, read from every input before any write


def test_flat_entries_and_parameters_can_be_written_in_place_with_grad_mode_on() -> None:
    """Views made in no-grad mode refuse in-place writes under grad mode; flat views are made
    with grad mode on, whatever mode their maker runs in."""
    net, _ = twins()
    with torch.no_grad():
        d = averaging.copy_parameters(net)
        move(net, None, torch.float64)
    d.entries["a.weight"].add_(net.a.weight)  # grad mode on, and a value that requires grad
    dictionaries.move(d, None, torch.float64)
    d.entries["a.bias"].add_(net.a.bias)
    update = averaging.prepare_average(net, d)
    for a, p in update.averaged:
        a.add_(p)


# -- fuse_groups against the implementation it replaced ------------------------------------------------------


def fuse_groups_before(groups: list[list[torch.Tensor]]) -> list[flat.Run]:
    """`flat.fuse_groups` as it was before it was rewritten to read each tensor once (commit
    1b3c319), verbatim: the oracle for the split into runs, which the rewrite must not change."""
    runs: list[flat.Run] = []
    start = numel = 0
    ends: list[int] = []
    bases: list[int] = []
    kind: tuple[object, ...] | None = None
    for i, group in enumerate(groups):
        first = group[0]
        joinable = all(t.shape == first.shape and t.is_contiguous() for t in group)
        this = tuple((t.dtype, t.device) for t in group)
        if (
            joinable and i > start and this == kind
            and all(t.data_ptr() == end for t, end in zip(group, ends))
            and all(t.untyped_storage().data_ptr() == base for t, base in zip(group, bases))
        ):
            ends = [end + t.numel() * t.element_size() for t, end in zip(group, ends)]
            numel += first.numel()
            continue
        if i > start:
            runs.append((start, i, numel))
        start, numel = i, first.numel()
        if joinable:
            kind = this
            ends = [t.data_ptr() + t.numel() * t.element_size() for t in group]
            bases = [t.untyped_storage().data_ptr() for t in group]
        else:
            kind = None
    if len(groups) > start:
        runs.append((start, len(groups), numel))
    return runs


class _Cursor:
    """Where one position's next tensor goes: usually right after its previous one in the same
    buffer, sometimes after a gap, in another buffer of the same or another dtype or device, or a
    tensor of its own, an empty one, a non-contiguous view or a reshaped one."""

    def __init__(self, rng: torch.Generator) -> None:
        self.rng = rng
        self.buffer = self._new()
        self.at = 0

    def _pick(self, n: int) -> int:
        return int(torch.randint(n, (), generator=self.rng))

    def _new(self) -> torch.Tensor:
        dtype = (torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.int64)[self._pick(5)]
        device = "meta" if self._pick(6) == 0 else "cpu"
        return torch.empty(4096, dtype=dtype, device=device)

    def next(self, shape: tuple[int, ...]) -> torch.Tensor:
        move = self._pick(14)
        if move == 0:
            self.at += 1 + self._pick(3)  # a gap
        elif move == 1:
            self.buffer, self.at = self._new(), self._pick(3)  # another storage
        elif move == 2:
            return torch.empty(shape, dtype=self.buffer.dtype)  # a tensor of its own
        elif move == 3:
            return self.buffer[self.at:self.at]  # an empty view where the run goes on
        elif move == 4:
            return torch.empty(0, dtype=self.buffer.dtype)  # an empty tensor of its own
        numel = math.prod(shape)
        if self.at + numel > self.buffer.numel():
            self.buffer, self.at = self._new(), 0
        t = self.buffer[self.at:self.at + numel]
        self.at += numel
        if move == 5 and len(shape) == 2 and shape[0] > 1 and shape[1] > 1:
            return t.view(shape[::-1]).t()  # non-contiguous, of the same shape and span
        if move == 6:
            return t.view(numel)  # the same span in another shape
        return t.view(shape)


@pytest.mark.parametrize("seed", range(40))
def test_fuse_groups_splits_every_layout_into_the_runs_it_did_before_its_rewrite(seed: int) -> None:
    """Random layouts of groups (a result and its inputs, or an average's pairs): back to back
    mostly, with gaps, storages shared across positions, dtype and device (meta) changes, empty
    and non-contiguous tensors, shapes that differ within a group and groups of differing length."""
    rng = torch.Generator().manual_seed(seed)
    for _ in range(25):
        width = 1 + int(torch.randint(4, (), generator=rng))
        cursors = [_Cursor(rng) for _ in range(width + 1)]
        if int(torch.randint(3, (), generator=rng)) == 0:
            cursors[1] = cursors[0]  # two positions in one storage: a result written into an input's buffer
        groups: list[list[torch.Tensor]] = []
        for _ in range(int(torch.randint(1, 30, (), generator=rng))):
            shape = ((2, 3), (5,), (3, 2), (1,), (0,), (4, 4), ())[int(torch.randint(7, (), generator=rng))]
            size = width + (1 if int(torch.randint(12, (), generator=rng)) == 0 else 0)  # groups of differing length
            group = [c.next(shape) for c in cursors[:size]]
            if size > 1 and int(torch.randint(12, (), generator=rng)) == 0:
                group[-1] = group[-1].reshape(-1)[:1]  # a value that broadcasts
            groups.append(group)
        assert flat.fuse_groups(groups) == fuse_groups_before(groups)
