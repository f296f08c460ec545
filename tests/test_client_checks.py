"""What the Python client checks or works out itself before a call, found by a review of the client:
values that cannot be sent fail before any call starts; option values that are numpy or torch
scalars keep their value; a bare handle id means what its Handle means; torch helpers take arrays
of either byte order. Real servers on loopback."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from conftest import LiveServer
from weightavg import Client, InvalidArgumentError
from weightavg._client import dtype_label
from weightavg.v1 import weightavg_pb2 as pb

NET = ["sequential", ["linear", "a", 4, 3], ["batchnorm1d", "b", 3], ["linear", "d", 3, 2]]


def _calls(c: Client) -> int:
    """Calls the server has counted, of every method (each refused upload below must add none)."""
    return sum(int(m["count"]) for m in c.stats()["methods"].values())


@pytest.mark.parametrize("value", [
    np.ones(3, np.uint32), np.ones(3, np.uint16), np.array(["a", "b"]), np.array([object(), 1], dtype=object),
    np.ones(2, ml_dtypes.float8_e4m3fn), [[1, 2], [3]], 2**70,
], ids=["uint32", "uint16", "str", "object", "float8", "ragged", "int past int64"])
def test_a_value_that_cannot_be_sent_fails_before_any_call(live_server: LiveServer, value: Any) -> None:
    """Such a value used to be found inside gRPC's request thread after the first message had gone:
    UNKNOWN "Exception iterating requests!", and a create could still make an empty dictionary."""
    with Client(live_server.address, timeout=60) as c:
        q = c.module(NET)
        m = c.model(c.addref(q), c.loss("ce"), c.opt("sgd", q, 0.1))  # the model takes over the handles it is given
        d = c.dict({"ok": np.ones(2, np.float32)})
        handles, calls = len(c.handles()), _calls(c) + 1  # the count is read inside the stats call
        uploads = [
            lambda: c.dict({"a": value}), lambda: c.dict(d, "a", value), lambda: c.parm(q, "a.bias", value),
            lambda: c.tensor(value), lambda: c.train(m, value, np.zeros(2, np.int64)), lambda: c.nforward(q, value),
            lambda: c.evaluate(m, value),
        ]
        for upload in uploads:
            with pytest.raises((TypeError, ValueError, OverflowError)):
                upload()
        assert _calls(c) == calls and len(c.handles()) == handles  # no call but the first stats()


def test_dictionary_keys_must_be_strings(client: Client) -> None:
    before = len(client.handles())
    with pytest.raises(TypeError, match="keys must be strings"):
        client.dict({1: np.ones(2, np.float32)})
    assert len(client.handles()) == before


def test_numpy_and_torch_scalars_as_option_values_keep_their_value(client: Client) -> None:
    """int() of a 0-d float array is its integer part: lr 0.05 given as np.array(0.05) became 0."""
    torch = pytest.importorskip("torch")
    for lr in (np.array(0.05), np.float32(0.05), torch.tensor(0.05), np.float64(0.05)):
        q = client.module(["linear", 2, 1])
        o = client.opt("sgd", q, lr, momentum=np.array(0.9))
        assert client.lr(o) == pytest.approx(0.05)
        assert client.model(client.model(q, client.loss("mse"), o))["optimizer"]["momentum"] == pytest.approx(0.9)
    q = client.module(["conv2d", 1, 1, np.array([3, 3])])
    assert client.module(q)[0].options["size"] == (3, 3)


def test_a_bare_model_id_recalculates_batchnorm_as_its_handle_does(client: Client) -> None:
    """batchnorm(m.id) reset the statistics (the module verb) where batchnorm(m) recalculates them:
    the client told the two apart by the Handle's kind, which a bare id lacks; it now asks."""
    x = np.random.default_rng(0).standard_normal((20, 4), dtype=np.float32)
    twins = []
    for _ in range(2):
        q = client.module(NET)
        m = client.model(q, client.loss("ce"), client.opt("sgd", q, 0.1))
        client.train(m, x, np.arange(20) % 2)
        client.run(m)
        twins.append(m)
    client.copyparms(twins[1], client.copyparms(twins[0], buffers=True))
    by_handle, by_id = client.batchnorm(twins[0]), client.batchnorm(twins[1].id)
    assert by_handle == by_id == {"b": 0.1}
    first, second = client.dict(client.buffers(twins[0])), client.dict(client.buffers(twins[1]))
    for name in ("b.running_mean", "b.running_var"):
        assert np.any(first[name] != 0) and np.array_equal(first[name], second[name])
    new_loss = client.loss("mse")
    assert client.model(twins[1].id, new_loss).id == twins[1].id  # a bare id updates a model too
    assert client.model(twins[1])["loss"]["type"] == "mse"


def test_a_bare_tensor_id_fetches_the_tensor(client: Client) -> None:
    t = client.tensor(np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(client.tensor(t.id), np.arange(3, dtype=np.float32))


def test_a_bare_module_id_describes_the_module_as_its_handle_does(client: Client) -> None:
    """module(q.id) sent the id as a one-layer spec: "unrecognized module type: 'mod_...'" and every
    layer type. A string that is neither a layer type nor a handle keeps the server's refusal."""
    q = client.module(NET)
    assert client.module(q.id) == client.module(q)
    q2 = client.module(NET)
    m = client.model(q2, client.loss("ce"), client.opt("sgd", q2, 0.1))
    assert client.module(m.id) == client.module(m) == client.module(q)
    assert client.module(m.id)[1].module == "linear"
    handles = len(client.handles())
    assert client.module("relu").kind == "module"  # a string that is a layer type still builds one
    with pytest.raises(InvalidArgumentError) as err:
        client.module("relux")
    assert err.value.message.startswith("unrecognized module type: 'relux'; did you mean 'relu'")
    assert len(client.handles()) == handles + 1


def test_a_bare_tensor_id_is_a_forward_input_as_its_handle_is(client: Client) -> None:
    """forward(q, t.id) sent the id string as a tensor and failed: "dtype <U36 cannot be sent"."""
    q = client.module(["linear", 2, 1])
    t = client.tensor(np.arange(6, dtype=np.float32).reshape(3, 2))
    for forward in (client.forward, client.nforward, client.eforward):
        np.testing.assert_array_equal(client.tensor(forward(q, t.id)), client.tensor(forward(q, t)))


def test_a_sparse_torch_tensor_is_refused_naming_the_fix(client: Client) -> None:
    """Client.dict of a sparse tensor failed inside torch as "unsupported memory format option
    Contiguous", which named neither the tensor's layout nor what to send instead."""
    torch = pytest.importorskip("torch")
    before = len(client.handles())
    for sparse in (torch.eye(3).to_sparse(), torch.eye(3).to_sparse_csr()):
        with pytest.raises(TypeError, match=r"layout torch\.sparse_\w+ cannot be sent; send t\.to_dense\(\)"):
            client.dict({"w": sparse})
    assert len(client.handles()) == before


def test_a_masked_array_with_masked_entries_is_refused_and_one_without_is_sent(client: Client) -> None:
    """np.asarray drops a mask: the values under it were stored as if they were data, silently."""
    before = len(client.handles())
    masked = np.ma.array([1.0, 99.0], mask=[False, True])
    with pytest.raises(TypeError, match=r"masked entries cannot be sent .* value\.filled\(fill_value\)"):
        client.dict({"w": masked})
    assert len(client.handles()) == before
    d = client.dict({"w": np.ma.array([1.0, 2.0], mask=[False, False]), "f": masked.filled(0.0)})
    assert client.dict(d, "w").tolist() == [1.0, 2.0] and client.dict(d, "f").tolist() == [1.0, 0.0]


def test_from_array_takes_either_byte_order() -> None:
    torch = pytest.importorskip("torch")
    from weightavg.torch import from_array

    for dtype in (">f4", "<f4", ">i8", ">c16"):
        array = np.arange(3).astype(dtype)
        t = from_array(array)
        assert torch.equal(t, torch.from_numpy(array.astype(array.dtype.newbyteorder("="))))


def test_cpu_torch_tensors_go_bit_for_bit_through_every_upload_verb(client: Client) -> None:
    """Every upload verb takes GPU tensors (copied to the host bit for bit); CPU ones went through
    np.asarray, which fails for bfloat16 ("Got unsupported ScalarType BFloat16"), for a tensor that
    requires grad (every nn.Parameter) and for a conjugate view."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    values = {
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "param": torch.nn.Parameter(torch.randn(3, 4, generator=g)),
        "conj": torch.randn(4, dtype=torch.complex64, generator=g).conj(),
        "neg": torch.randn(4, dtype=torch.complex128, generator=g).conj().imag,  # a negative view
        "strided": torch.randn(4, 6, generator=g).t(),
    }

    def same(got: Any, want: Any) -> bool:
        want = want.detach().resolve_conj().resolve_neg()
        if want.dtype == torch.bfloat16:
            return got.dtype == np.dtype(ml_dtypes.bfloat16) and torch.equal(
                torch.from_numpy(np.ascontiguousarray(got).view(np.int16)), want.view(torch.int16))
        return torch.equal(torch.from_numpy(np.ascontiguousarray(got)), want)

    d = client.dict(values)
    assert all(same(client.dict(d, k), v) for k, v in values.items())
    client.dict(d, "bf16", values["param"])
    assert same(client.dict(d, "bf16"), values["param"])
    assert same(client.tensor(client.tensor(values["bf16"])), values["bf16"])
    q = client.module(["linear", 3, 4])
    client.parm(q, "weight", values["param"].detach().t().contiguous().requires_grad_())
    assert same(client.parm(q, "weight"), values["param"].t())
    out = client.tensor(client.eforward(q, values["param"][:, :3]))
    assert out.shape == (3, 4)
    with pytest.raises(TypeError, match="cannot be sent"):
        client.dict({"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)})


def test_an_empty_list_of_keys_fetches_nothing(client: Client) -> None:
    """The wire's empty list of names means every entry: dict(d, []) fetched the whole dictionary
    (a model's worth of bytes) to return []."""
    def fetches() -> int:
        return sum(int(m["count"]) for name, m in client.stats()["methods"].items() if name.endswith("/FetchTensors"))

    d = client.dict({"a": np.ones(1000, np.float32)})
    before = fetches()
    assert client.dict(d, []) == [] and client.dict(d, ()) == []
    assert fetches() == before
    assert client.dict(d, ["a"])[0].shape == (1000,) and fetches() == before + 1  # counted, where one is made


def test_a_list_of_numpy_or_torch_integers_is_a_size_list(client: Client) -> None:
    """A size such as ``list(np.array([3, 3]))`` holds numpy ints: the array passed, its list was
    refused TypeError. A bool in a list is still refused before any call; a list of numbers goes as
    one (a merge option's gradient) and the server refuses it for a size, nothing made."""
    torch = pytest.importorskip("torch")
    for size in ([np.int64(3), np.int64(3)], (torch.tensor(3), 3)):
        q = client.module(["conv2d", 1, 1, size])
        assert client.module(q)[0].options["size"] == (3, 3)
    before = len(client.handles())
    with pytest.raises(TypeError, match="list of numbers"):
        client.module(["conv2d", 1, 1, [3, np.bool_(True)]])
    with pytest.raises(InvalidArgumentError, match="expects an integer or a tuple of integers, given tuple"):
        client.module(["conv2d", 1, 1, [np.float64(3.0), 3]])
    assert len(client.handles()) == before


@pytest.mark.parametrize("timeout", [-1, 0, float("nan"), float("inf"), 1e300, True, "soon"])
def test_a_timeout_grpc_cannot_wait_is_refused_when_the_client_is_made(live_server: LiveServer, timeout: Any) -> None:
    """The commands refused these (found by review); the library took them, and every call then
    answered DEADLINE_EXCEEDED at once, as if the server were too slow."""
    with pytest.raises(ValueError, match="timeout"):
        Client(live_server.address, timeout=timeout)
    with Client(live_server.address, timeout=1e9) as c:  # the longest: served
        c.ping()


@pytest.mark.parametrize("call", [
    lambda c, d: c.dict(d, 1), lambda c, d: c.dict(d, ["w", 1]), lambda c, d: c.dict(d, b"w"),
    lambda c, d: c.delete(d, 1), lambda c, d: c.size(5),
    lambda c, d: c.free(d.id.encode()), lambda c, d: c.parm(7, "w"), lambda c, d: c.size(c.Dictionary({"v": 1.0})),
], ids=["key int", "key in list", "key bytes", "delete int", "size int", "free bytes", "parm int", "object"])
def test_a_name_or_handle_that_is_not_a_string_is_a_clear_type_error(client: Client, call: Any) -> None:
    """An int failed inside protobuf as "bad argument type for built-in operation", and a bytes key
    was fetched under its decoded name and then looked up as bytes: KeyError b'w'."""
    d = client.dict({"w": np.ones(2, np.float32)})
    with pytest.raises(TypeError, match=r"^(names are strings|a handle is a Handle or its id string), not "):
        call(client, d)
    assert np.array_equal(client.dict(d, "w"), np.ones(2))  # the dictionary is as it was


@pytest.mark.parametrize("call", [
    lambda c, x: c.evaluate(None, x), lambda c, x: c.forward(None, x), lambda c, x: c.eforward(7, x),
    lambda c, x: c.parm(None, "w", x), lambda c, x: c.forward(None, None),
], ids=["evaluate", "forward", "eforward int", "parm set", "forward no input"])
def test_a_streamed_call_given_no_handle_is_a_clear_type_error(client: Client, call: Any) -> None:
    """Checked inside the request stream, the TypeError was swallowed by gRPC and the caller got
    UNKNOWN "Exception iterating requests!" (found by review)."""
    with pytest.raises(TypeError, match=r"^a handle is a Handle or its id string, not "):
        call(client, np.ones((2, 3), np.float32))


def test_a_setter_given_more_than_one_value_sets_nothing(client: Client) -> None:
    """dict(p, key, value) and parm(m, name, value) dropped any value after the first without a
    word: dict(p, "a", x, "b", y) set 'a' alone."""
    d = client.dict({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)})
    q = client.module(["linear", 2, 1])
    weight = client.parm(q, "weight")
    with pytest.raises(TypeError, match=r"takes one value, given 3"):
        client.dict(d, "a", np.ones(2), "b", np.ones(2))
    with pytest.raises(TypeError, match=r"takes one value, given 2"):
        client.parm(q, "weight", np.ones((1, 2)), np.ones((1, 2)))
    assert not client.dict(d, "a").any() and not client.dict(d, "b").any()
    assert np.array_equal(client.parm(q, "weight"), weight)


def test_a_session_client_dropped_without_close_is_collected_and_stops_renewing(live_server: LiveServer) -> None:
    """The keep-alive thread held the client through a bound method: a session client dropped
    without close() was never garbage collected and renewed its lease, holding its handles on the
    server, until the process ended."""
    import gc
    import weakref

    c = Client(live_server.address, timeout=60, session=True)
    c.dict({"w": np.ones(2, np.float32)})
    thread, collected = c._keepalive, weakref.ref(c)
    assert thread is not None and thread.is_alive()
    del c
    gc.collect()
    assert collected() is None
    thread.join(60)  # a bound on a hang, not a timing: the collected client's finalizer stopped it
    assert not thread.is_alive()


@pytest.mark.parametrize("settings", [
    {"chunk_bytes": 80 << 20}, {"max_message_bytes": 1 << 20}, {"chunk_bytes": 1, "max_message_bytes": 1000},
], ids=["chunks over the default cap", "cap under the default chunks", "cap under the header room"])
def test_chunks_that_cannot_fit_the_message_cap_are_refused_when_the_client_is_made(
    live_server: LiveServer, settings: dict[str, int]
) -> None:
    """Such a client was made, and every upload of a tensor larger than its cap then failed
    RESOURCE_EXHAUSTED "CLIENT: Sent message larger than max"."""
    with pytest.raises(ValueError, match=r"leaves no room in max_message_bytes .*; (give chunk_bytes=\d+ or less|raise max_message_bytes above 1024)$"):
        Client(live_server.address, **settings)  # type: ignore[arg-type]
    value = np.arange(1 << 19, dtype=np.float32)  # 2 MiB: two full chunks and a rest
    with Client(live_server.address, chunk_bytes=(1 << 20) - 1024, max_message_bytes=1 << 20, timeout=60) as c:
        d = c.dict({"x": value})  # the largest chunks that fit the cap go up
    with Client(live_server.address, timeout=60) as c:  # the server's chunks may be larger than 1 MiB
        np.testing.assert_array_equal(c.dict(d, "x"), value)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 1e10, True, "soon"])
def test_a_timeout_set_after_the_client_is_made_is_checked_as_the_constructor_s(bad: object) -> None:
    """`c.timeout = -1` was taken as it was, and every later call then answered DEADLINE_EXCEEDED at once."""
    client = Client("127.0.0.1:1", timeout=5.0)
    try:
        with pytest.raises(ValueError, match="timeout"):
            client.timeout = bad  # type: ignore[assignment]
        assert client.timeout == 5.0  # a refused value changes nothing
        client.timeout = 7
        assert client.timeout == 7.0
    finally:
        client.close()


def test_a_listed_dtype_this_client_does_not_know_is_named_not_raised() -> None:
    """A newer server may list a dtype this protocol lacks: `handles()` and `info()` raised
    ValueError from protobuf's enum lookup for the whole listing."""
    assert dtype_label(pb.DTYPE_FLOAT32) == "float32"
    assert dtype_label(pb.DTYPE_BFLOAT16) == "bfloat16"
    assert dtype_label(999) == "unknown dtype 999"  # type: ignore[arg-type]


def test_a_numpy_or_torch_dtype_is_taken_where_a_dtype_name_is(client: Client) -> None:
    """copyparms(m, dtype=torch.float32), what a torch user writes first, failed in the client as
    "'torch.dtype' object has no attribute 'lower'" (np.float32 the same way), before any call."""
    torch = pytest.importorskip("torch")
    m = client.module(["linear", 3, 2])
    for dtype, name in ((np.float64, "float64"), (np.dtype("float16"), "float16"), (ml_dtypes.bfloat16, "bfloat16"),
                        (torch.float64, "float64"), (torch.bfloat16, "bfloat16")):
        copy = client.copyparms(m, dtype=dtype)
        assert {info.dtype for info in client.handles() if info.handle.id == copy.id} == {name}
        client.free(copy)
    client.to(m, dtype=torch.float64)
    assert client.parm(m, "weight").dtype == np.float64
    before = _calls(client) + 1  # the count is read inside the stats call
    with pytest.raises(TypeError, match=r"^dtype must be a name such as 'float32', a numpy dtype or a torch dtype, not int 3$"):
        client.copyparms(m, dtype=3)
    with pytest.raises(ValueError, match=r"^unknown dtype 'float8_e4m3fn'"):
        client.to(m, dtype=torch.float8_e4m3fn)
    assert _calls(client) == before  # no call but the first stats()


def test_values_given_where_a_handle_goes_are_named_briefly_with_the_upload_to_do(client: Client) -> None:
    """merge(..., base=model.state_dict()) raised a TypeError holding the repr of every tensor of the
    state dict, and nothing of the fix: values are uploaded first (c.dict, push), then passed by handle."""
    torch = pytest.importorskip("torch")
    tuned = [client.dict({"w": np.ones(3, np.float32)}) for _ in range(2)]
    state = torch.nn.Linear(300, 200).state_dict()
    before = _calls(client) + 1  # the count is read inside the stats call
    with pytest.raises(TypeError) as err:
        client.merge("ties", tuned, base=state, density=0.5)
    assert str(err.value) == (
        "a handle is a Handle or its id string, not OrderedDict of 2 entries; upload named values first: "
        "c.dict(values) (weightavg.torch.push(c, state_dict) for tensors) returns a handle"
    )
    with pytest.raises(TypeError) as err:
        client.average([tuned[0], np.zeros((200, 300), np.float32)])
    assert str(err.value) == (
        "a handle is a Handle or its id string, not ndarray of shape [200, 300]; upload an array or tensor first: "
        "c.tensor(x) returns a handle"
    )
    assert _calls(client) == before  # no call but the first stats()


def test_an_integer_count_set_in_a_dictionary_is_sent_as_the_float64_the_server_counts_in(client: Client) -> None:
    """dict(p, ".n", 5) stored an int64 count, and the next avgparms refused the dictionary ("'.n' must
    be a 0-dim float64 count"), one call after the one that set it. Other entries keep their dtype."""
    q = client.module(["linear", 2, 1])
    for n in (5, np.int64(5), np.array(5, np.int32)):
        p = client.copyparms(q)
        client.dict(p, ".n", n)
        assert client.avgparms(q, p) == 6
        client.dict(p, {".n": n, "k": n})
        assert client.avgparms(q, p) == 6 and client.dict(p, "k") == 5
        assert client.dict(client.dict({".n": n, "w": np.ones(1)}), ".n") == 5.0
    kept = client.dict(client.dict({"k": 5}), "k")
    assert kept == 5 and isinstance(kept, int)  # another entry's integer stays an integer


def test_a_call_after_the_with_block_says_the_client_was_closed(live_server: LiveServer) -> None:
    """A call on a closed client failed inside gRPC as "ValueError: Cannot invoke RPC on closed
    channel!", naming neither the client nor the usual cause, a call after the with block."""
    with Client(live_server.address, session=True) as c:
        q = c.module(["linear", 2, 1])
    with pytest.raises(RuntimeError) as err:
        c.parm(q, "weight")
    assert str(err.value) == (
        "this Client is closed (by close(), or the end of its with block) and its session's handles were freed: "
        "make the call inside the block, or make a new Client(address)"
    )
    with Client(live_server.address) as plain:
        pass
    plain.close()  # a second close is harmless
    with pytest.raises(RuntimeError, match=r"^this Client is closed \(by close\(\), or the end of its with block\): make"):
        plain.ping()


def test_a_call_on_a_closed_client_says_to_make_a_new_one(live_server: LiveServer) -> None:
    c = Client(live_server.address)
    d = c.dict({"w": np.ones(3, np.float32)})
    c.close()
    c.close()  # closing twice does nothing more
    calls = {
        "ping": lambda: c.ping(),
        "upload": lambda: c.dict({"w": np.ones(3, np.float32)}),
        "fetch": lambda: c.dict(d, "w"),
        "module": lambda: c.module(["linear", 2, 1]),
        "average": lambda: c.average([d, d]),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="this Client is closed") as caught:
            call()
        assert "Client(address)" in str(caught.value), name
    with Client(live_server.address) as other:  # the server and its handles are untouched
        assert other.dict(d, "w").tolist() == [1.0, 1.0, 1.0]
        other.free(d)


@pytest.mark.parametrize("shm", [False, True], ids=["stream", "shared memory"])
def test_a_read_with_arrays_keeps_0_dim_entries_as_arrays_of_their_dtype(
    start_server: Any, shm: bool
) -> None:
    """dict(p) turns 0-dim entries into Python scalars (a float32 2.5 becomes 2.5, a float64 count 2.0);
    dict(p, arrays=True) keeps every value an array of its own dtype, as a file of tensors needs, for
    a whole read, one key, a list of keys and with the etag; arrays= on a write or a creation is a
    TypeError before any call."""
    server = start_server(allow_shm=True)
    with Client(server.address, shm=shm) as c:
        values = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(2.5, np.float32),
                  "i": np.array(7, np.int64), "h": np.array(1.5, ml_dtypes.bfloat16)}
        p = c.dict(values)
        assert c.dict(p, "s") == 2.5 and not isinstance(c.dict(p, "s"), np.ndarray)
        whole = c.dict(p, arrays=True)
        assert list(whole) == list(values)
        for name, value in values.items():
            assert isinstance(whole[name], np.ndarray) and whole[name].dtype == value.dtype, name
            assert whole[name].shape == value.shape and np.array_equal(whole[name], value), name
        one = c.dict(p, "i", arrays=True)
        assert isinstance(one, np.ndarray) and one.shape == () and one.dtype == np.int64 and int(one) == 7
        some = c.dict(p, ["h", "w"], arrays=True)
        assert [a.dtype for a in some] == [values["h"].dtype, np.float32]
        read, tag = c.dict(p, arrays=True, with_etag=True)
        assert tag == c.etag(p) and read["s"].dtype == np.float32
        assert c.dict(p, [], arrays=True) == []
        before = _calls(c) + 1  # the count is read inside the stats call
        for call in (lambda: c.dict(p, "s", np.float32(1), arrays=True), lambda: c.dict(p, {"s": 1.0}, arrays=True),
                     lambda: c.dict({"x": np.ones(2)}, arrays=True)):
            with pytest.raises(TypeError, match="arrays= applies to reads"):
                call()
        assert _calls(c) == before
