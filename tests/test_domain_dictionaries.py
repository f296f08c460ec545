"""domain.dictionaries in process: plain dictionaries (entries replaced) and live views (a module's own
tensors, updated in place). Every refused call must leave the dictionary, and a view's module, as it was.
"""

from __future__ import annotations

import pytest
import torch

from weightavg_server.domain import dictionaries, modules
from weightavg_server.domain.dictionaries import COUNT_KEY, TensorDict
from weightavg_server.domain.errors import InvalidArgument, NotFound

CPU = torch.device("cpu")


def plain() -> TensorDict:
    return TensorDict({
        "w": torch.arange(6.0).reshape(2, 3),
        "i": torch.arange(3),
        "h": torch.ones(2, dtype=torch.float64),
        COUNT_KEY: torch.tensor(4.0, dtype=torch.float64),
    })


def snapshot(d: TensorDict) -> list[tuple[str, torch.Tensor]]:
    return [(name, t.detach().clone()) for name, t in d.entries.items()]


def assert_unchanged(d: TensorDict, before: list[tuple[str, torch.Tensor]]) -> None:
    assert [name for name, _ in before] == list(d.entries)
    for name, t in before:
        torch.testing.assert_close(d.entries[name].detach(), t, rtol=0, atol=0, msg=name)


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def assert_module_unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, t in module.state_dict().items():
        torch.testing.assert_close(t, before[name], rtol=0, atol=0, msg=name)


def bn_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


# -- set_entries on a plain dictionary ------------------------------------------------------------


def test_set_entries_on_plain_dictionary_replaces_and_appends_in_order() -> None:
    d = plain()
    names = dictionaries.set_entries(d, [("i", torch.tensor(0.5)), ("new", torch.zeros(4, 4)), ("w", torch.tensor([1, 2]))], CPU)
    assert names == ["i", "new", "w"]
    assert list(d.entries) == ["w", "i", "h", COUNT_KEY, "new"]
    # replaced outright: a different dtype and shape are fine, nothing is copied into the old tensor
    assert d.entries["i"].dtype == torch.float32 and d.entries["i"].shape == ()
    assert torch.equal(d.entries["w"], torch.tensor([1, 2]))
    assert torch.equal(d.entries["new"], torch.zeros(4, 4))


def test_set_entries_on_plain_dictionary_does_not_write_into_the_old_tensor() -> None:
    d = plain()
    old = d.entries["w"]
    dictionaries.set_entries(d, [("w", torch.zeros(2, 3))], CPU)
    assert torch.equal(old, torch.arange(6.0).reshape(2, 3))


def test_set_entries_keeps_the_count_on_the_cpu_as_given() -> None:
    d = TensorDict()
    dictionaries.set_entries(d, [(COUNT_KEY, torch.tensor(7.0, dtype=torch.float64))], CPU)
    n = d.entries[COUNT_KEY]
    assert n.device.type == "cpu" and n.dtype == torch.float64 and n.item() == 7.0


@pytest.mark.parametrize("live", [False, True], ids=["plain", "live"])
def test_set_entries_with_an_empty_key_sets_nothing(live: bool) -> None:
    module = bn_module()
    d = modules.view_parameters(module) if live else plain()
    first = next(iter(d.entries))
    before, state = snapshot(d), module_state(module)
    with pytest.raises(InvalidArgument, match="keys must not be empty"):
        dictionaries.set_entries(d, [(first, torch.tensor(3.0)), ("", torch.tensor(1.0))], CPU)
    assert_unchanged(d, before)
    assert_module_unchanged(module, state)


# -- set_entries on a live view -------------------------------------------------------------------


def test_set_entries_on_live_view_copies_into_the_module_in_place() -> None:
    module = bn_module()
    view = modules.view_parameters(module)
    weight = module[0].weight
    names = dictionaries.set_entries(view, [("0.weight", torch.tensor(2)), ("1.bias", torch.tensor([1.0, -1.0]))], CPU)
    assert names == ["0.weight", "1.bias"]
    assert module[0].weight is weight and view.entries["0.weight"] is weight  # same tensors, new values
    assert torch.equal(module[0].weight, torch.full((2, 3), 2.0)) and weight.dtype == torch.float32
    assert torch.equal(module[1].bias, torch.tensor([1.0, -1.0]))
    assert weight.is_leaf and weight.requires_grad and weight.grad_fn is None


def test_set_entries_on_buffer_view_is_seen_by_the_module() -> None:
    module = bn_module()
    view = modules.view_buffers(module, "1")
    dictionaries.set_entries(view, [("running_mean", torch.tensor(0.25)), ("num_batches_tracked", torch.tensor(9))], CPU)
    assert torch.equal(module[1].running_mean, torch.full((2,), 0.25))
    assert int(module[1].num_batches_tracked) == 9


@pytest.mark.parametrize(
    "values, error, message",
    [
        ([("0.weight", torch.zeros(2, 3)), ("nope", torch.zeros(1))], NotFound, r"'nope' is not a tensor of the module"),
        ([("0.weight", torch.zeros(2, 3)), (COUNT_KEY, torch.tensor(1.0))], NotFound, r"'\.n' is not a tensor"),
        ([("0.weight", torch.zeros(2, 3)), ("0.bias", torch.zeros(3))], InvalidArgument,
         r"\(a: the module's '0.bias', shape \[2\]; b: the value for '0.bias', shape \[3\]\); nothing changed$"),
        ([("0.weight", torch.zeros(2, 3)), ("1.weight", torch.zeros(4, 2))], InvalidArgument, r"b: the value for '1.weight', shape \[4, 2\]"),
    ],
    ids=["unknown-name", "count", "wrong-size", "extra-dimension"],
)
def test_set_entries_on_live_view_is_all_or_nothing(
    values: list[tuple[str, torch.Tensor]], error: type[Exception], message: str
) -> None:
    module = bn_module()
    view = modules.view_parameters(module)
    before, state = snapshot(view), module_state(module)
    with pytest.raises(error, match=message):
        dictionaries.set_entries(view, values, CPU)
    assert_unchanged(view, before)
    assert_module_unchanged(module, state)


# -- delete_entries -------------------------------------------------------------------------------


def test_delete_entries_removes_keys_and_tolerates_repeats() -> None:
    d = plain()
    dictionaries.delete_entries(d, ["i", COUNT_KEY, "i"])
    assert list(d.entries) == ["w", "h"]


def test_delete_entries_with_a_missing_key_deletes_nothing() -> None:
    d = plain()
    before = snapshot(d)
    with pytest.raises(NotFound, match="no entry 'zz'; nothing deleted"):
        dictionaries.delete_entries(d, ["w", "zz"])
    assert_unchanged(d, before)


def test_delete_entries_on_live_view_is_refused() -> None:
    module = bn_module()
    view = modules.view_parameters(module)
    with pytest.raises(InvalidArgument, match="live view"):
        dictionaries.delete_entries(view, ["0.weight"])
    assert list(view.entries) == [name for name, _ in module.named_parameters()]


# -- select and sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names, expected",
    [([], ["w", "i", "h", COUNT_KEY]), (["h", "w"], ["h", "w"]), (["w", "w"], ["w", "w"]), ([COUNT_KEY], [COUNT_KEY])],
    ids=["all", "request-order", "repeat", "count"],
)
def test_select_returns_entries_in_request_order(names: list[str], expected: list[str]) -> None:
    d = plain()
    selected = dictionaries.select(d, names)
    assert [name for name, _ in selected] == expected
    assert all(t is d.entries[name] for name, t in selected)


def test_select_with_a_missing_name_is_not_found() -> None:
    with pytest.raises(NotFound, match="no entry 'q'"):
        dictionaries.select(plain(), ["w", "q"])


def test_select_on_live_view_gives_the_module_tensors_themselves() -> None:
    module = bn_module()
    selected = dict(dictionaries.select(modules.view_buffers(module), []))
    assert selected["1.running_var"] is module[1].running_var


def test_sizes_lists_each_shape_in_order() -> None:
    assert dictionaries.sizes(plain()) == [("w", (2, 3)), ("i", (3,)), ("h", (2,)), (COUNT_KEY, ())]
    module = bn_module()
    assert dictionaries.sizes(modules.view_parameters(module)) == [
        ("0.weight", (2, 3)), ("0.bias", (2,)), ("1.weight", (2,)), ("1.bias", (2,)),
    ]


# -- move -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_move_converts_floating_entries_only_and_keeps_the_count_a_cpu_float64(dtype: torch.dtype) -> None:
    d = plain()
    before = dict(snapshot(d))
    dictionaries.move(d, None, dtype)
    assert list(d.entries) == ["w", "i", "h", COUNT_KEY]
    assert d.entries["w"].dtype == dtype and d.entries["h"].dtype == dtype
    torch.testing.assert_close(d.entries["w"], before["w"].to(dtype))
    assert d.entries["i"].dtype == torch.int64 and torch.equal(d.entries["i"], before["i"])
    n = d.entries[COUNT_KEY]
    assert n.dtype == torch.float64 and n.device.type == "cpu" and n.dim() == 0 and n.item() == 4.0


def test_move_to_the_same_device_without_dtype_changes_nothing() -> None:
    d = plain()
    before = snapshot(d)
    dictionaries.move(d, CPU, None)
    assert_unchanged(d, before)
    assert all(t.device == CPU for t in d.entries.values())


def test_move_of_a_live_view_is_refused_and_the_module_keeps_its_dtype() -> None:
    module = bn_module()
    view = modules.view_parameters(module)
    with pytest.raises(InvalidArgument, match="moves with its module"):
        dictionaries.move(view, None, torch.float64)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert all(t.dtype == torch.float32 for t in view.entries.values())


@pytest.mark.parametrize(
    "t, expected",
    [(torch.zeros(1), True), (torch.zeros(1, dtype=torch.float16), True), (torch.zeros(1, dtype=torch.int64), False),
     (torch.zeros(1, dtype=torch.bool), False), (torch.zeros(1, dtype=torch.complex64), False)],
    ids=["float32", "float16", "int64", "bool", "complex64"],
)
def test_converts_is_true_for_floating_entries(t: torch.Tensor, expected: bool) -> None:
    assert dictionaries.converts(t) is expected


# -- check_copyable agrees with copy_ -------------------------------------------------------------


@pytest.mark.parametrize(
    "target_shape, source_shape",
    [((2, 3), ()), ((2, 3), (3,)), ((2, 3), (1, 3)), ((2, 3), (2, 1)), ((2, 3), (2, 4)), ((2, 3), (3, 2, 3)),
     ((2, 3), (6,)), ((), (1,)), ((), (2,))],
    ids=str,
)
def test_check_copyable_accepts_exactly_what_copy_accepts(target_shape: tuple[int, ...], source_shape: tuple[int, ...]) -> None:
    target, source = torch.zeros(target_shape), torch.ones(source_shape)
    try:
        target.clone().copy_(source)
        torch_ok = True
    except RuntimeError:
        torch_ok = False
    if torch_ok:
        dictionaries.check_copyable(target, source)
    else:
        with pytest.raises(InvalidArgument):
            dictionaries.check_copyable(target, source)
    assert torch.equal(target, torch.zeros(target_shape))  # judged without touching data


@pytest.mark.filterwarnings("ignore:Casting complex values to real")
def test_tensors_of_one_shape_are_copyable_between_every_wire_dtype() -> None:
    """check_copyable passes tensors of one shape without its meta trial: copy_ takes every dtype the
    wire carries into every other, which this checks on real tensors; but a complex source into a
    real target, which copy_ takes while dropping the imaginary part, is refused."""
    from weightavg_server.domain.dtypes import DTYPES

    for target_dtype in DTYPES.values():
        for source_dtype in DTYPES.values():
            target, source = torch.zeros(2, 3, dtype=target_dtype), torch.ones(2, 3, dtype=source_dtype)
            if source_dtype.is_complex and not target_dtype.is_complex:
                with pytest.raises(InvalidArgument, match="imaginary part"):
                    dictionaries.check_copyable(target, source)
                continue
            target.copy_(source)  # raises if torch refused the pair
            dictionaries.check_copyable(target, source)
            assert bool((target != 0).all())
