"""Conditional changes (AIP-154): every read can give the object's etag, every change of a dictionary
or a module's parameters can be made conditional on one, and a stale etag is ABORTED with nothing
changed. Through a real server (the stream and shared memory), and the store's versions in process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from weightavg import AbortedError, Client
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.domain.errors import Aborted
from weightavg_server.store import versions
from weightavg_server.store.registry import Kind, Registry

from conftest import LiveServer


def test_a_change_gives_its_group_a_new_version_and_a_read_or_a_refused_change_does_not() -> None:
    store = Registry()
    module = store.create(Kind.MODULE, {}, lambda: torch.nn.Linear(2, 1))
    entry = store.get(module)
    view = store.create(Kind.DICTIONARY, {}, lambda: {"weight": entry.obj.weight}, share=entry)
    first = versions.etag(entry.lock)
    assert versions.etag(store.get(view).lock) == first  # one group, one etag
    with store.reading(entry):
        pass
    assert versions.etag(entry.lock) == first
    with pytest.raises(Aborted, match="changed since the etag given was read"):
        with store.mutate(entry, need={}, etag="stale"):
            raise AssertionError("the body of a refused change never runs")
    assert versions.etag(entry.lock) == first
    with store.mutate(entry, need={}, etag=first):
        pass
    second = versions.etag(entry.lock)
    assert second != first and versions.etag(store.get(view).lock) == second
    other = store.create(Kind.MODULE, {}, lambda: torch.nn.Linear(2, 1))
    assert versions.etag(store.get(other).lock) not in (first, second)  # never another group's


def values(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}


def test_a_read_gives_the_etag_of_what_it_read_and_a_change_from_it_succeeds(client: Client) -> None:
    p = client.dict(values())
    read, tag = client.dict(p, with_etag=True)
    assert tag and tag == client.etag(p)
    assert client.etag(p) == tag and client.dict(p, "w", with_etag=True)[1] == tag  # reads change nothing
    client.dict(p, "w", read["w"] * 2, etag=tag)
    np.testing.assert_array_equal(client.dict(p, "w"), read["w"] * 2)
    assert client.etag(p) != tag


def test_a_listing_gives_each_objects_etag_and_a_change_from_it_succeeds(client: Client) -> None:
    """ListHandles rows carry the etag GetSize reads; a conditional change from a listed etag runs, and
    the next listing shows the new one (the module's view shares the module's)."""
    d = client.dict({"w": np.zeros(2, np.float32)})
    m = client.module(["linear", 2, 1])
    view = client.parms(m)

    def listed() -> dict[str, str]:
        return {info.handle.id: info.etag for info in client.handles()}

    before = listed()
    assert before[d.id] == client.etag(d) and before[m.id] == client.etag(m) == before[view.id] != before[d.id]
    client.dict(d, "w", np.ones(2, np.float32), etag=before[d.id])
    after = listed()
    assert after[d.id] == client.etag(d) != before[d.id] and after[m.id] == before[m.id]
    with pytest.raises(AbortedError):
        client.delete(d, "w", etag=before[d.id])


def test_a_change_given_a_stale_etag_is_aborted_and_changes_nothing(
    live_server: LiveServer, client: Client, unchanged: Callable[[], Any]
) -> None:
    """Two clients read the same dictionary; the first to write wins, the second is told to read
    again, and succeeds from what it reads then."""
    p = client.dict(values())
    with Client(live_server.address, timeout=60) as other:
        mine, tag = client.dict(p, with_etag=True)
        theirs, their_tag = other.dict(p, with_etag=True)
        assert tag == their_tag
        other.dict(p, "b", theirs["b"] + 1, etag=their_tag)
        with unchanged(), pytest.raises(AbortedError, match="read it again, with its etag"):
            client.dict(p, "b", mine["b"] * 10, etag=tag)
        again, tag = client.dict(p, with_etag=True)
        np.testing.assert_array_equal(again["b"], theirs["b"] + 1)
        client.dict(p, "b", again["b"] * 10, etag=tag)
    np.testing.assert_array_equal(client.dict(p, "b"), (theirs["b"] + 1) * 10)


def test_every_conditional_change_checks_its_target(client: Client, unchanged: Callable[[], Any]) -> None:
    """Each verb that takes etag= refuses a stale one with nothing changed, and goes on with the current one."""
    q = client.module(["linear", 3, 4])
    p = client.copyparms(q)
    e = client.copyparms(q)
    s = client.dict({"weight": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float32), "x": np.ones(2, np.float32)})
    stale_q, stale_p, stale_e, stale_s = (client.etag(h) for h in (q, p, e, s))
    client.parm(q, "bias", 1.0)
    client.avgparms(q, p)
    client.ema(q, e)
    client.delete(s, "x")
    changes: list[tuple[Any, Callable[[str], Any]]] = [
        (q, lambda t: client.parm(q, "bias", 2.0, etag=t)),
        (q, lambda t: client.copyparms(q, p, etag=t)),
        (p, lambda t: client.avgparms(q, p, etag=t)),
        (e, lambda t: client.ema(q, e, decay=0.5, etag=t)),
        (s, lambda t: client.dict(s, {"weight": np.ones((4, 3), np.float32)}, etag=t)),
        (s, lambda t: client.average([p, e], into=s, etag=t)),
        (s, lambda t: client.delete(s, "bias", etag=t)),
    ]
    stale = {q.id: stale_q, p.id: stale_p, e.id: stale_e, s.id: stale_s}
    for target, change in changes:
        with unchanged(), pytest.raises(AbortedError):
            change(stale[target.id])
        before = client.etag(target)
        change(before)
        assert client.etag(target) != before
    assert client.size(s) == {"weight": (4, 3)}


def test_a_modules_etag_changes_with_its_views_and_its_model(client: Client) -> None:
    """A live view shares its module's tensors and lock: a change through either moves both etags,
    so a change read from the view is refused after the module trained."""
    q = client.module(["linear", 3, 2])
    view = client.parms(q)
    read, tag = client.dict(view, with_etag=True)
    assert client.etag(q) == tag
    m = client.model(client.addref(q), client.loss("mse"), client.opt("sgd", q, 0.1))
    client.train(m, np.ones((8, 3), np.float32), np.zeros((8, 2), np.float32))
    client.run(m)
    assert client.etag(view) == client.etag(q) == client.etag(m) != tag
    with pytest.raises(AbortedError):
        client.dict(view, "weight", read["weight"], etag=tag)


def test_a_retried_conditional_change_gets_its_first_answer_not_aborted(live_server: LiveServer, client: Client) -> None:
    """A retry with the same request ID (its answer lost) finds the etag it gave stale, since its own
    first run changed the dictionary: it must get the first answer, not ABORTED."""
    q = client.module(["linear", 2, 1])
    p = client.copyparms(q)
    tag = client.etag(p)
    request = pb.AverageParametersRequest(
        handle=q.id, dictionary=p.id, etag=tag, request_id="8c7b5d84-46a5-4c4e-9a55-12ab34cd56ef"
    )
    with grpc.insecure_channel(live_server.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        assert stub.AverageParameters(request).count == 2
        assert stub.AverageParameters(request).count == 2  # the first answer, run once
        with pytest.raises(grpc.RpcError) as raised:
            stub.AverageParameters(pb.AverageParametersRequest(handle=q.id, dictionary=p.id, etag=tag))
    assert raised.value.code() is grpc.StatusCode.ABORTED
    assert client.dict(p, ".n") == 2.0


def test_a_stream_fetch_carries_the_etag_only_when_asked(live_server: LiveServer, client: Client) -> None:
    """FetchTensorsRequest.with_etag: the first message carries it (parsed by protobuf, as a client in
    another language would); without it no message does, and the chunks are as before."""
    p = client.dict({**values(), **{f"small{i}": np.full(3, i, np.float32) for i in range(5)}})
    with grpc.insecure_channel(live_server.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        for packed in (False, True):
            asked = list(stub.FetchTensors(pb.FetchTensorsRequest(handle=p.id, with_etag=True, packed_chunks=packed)))
            plain = list(stub.FetchTensors(pb.FetchTensorsRequest(handle=p.id, packed_chunks=packed)))
            assert asked[0].etag == client.etag(p) and not any(r.etag for r in asked[1:] + plain)
            assert [r.chunk for r in asked] == [r.chunk for r in plain]


def test_shared_memory_reads_give_the_same_etag(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(allow_shm=True)
    with Client(server.address, timeout=60, shm=True) as fast, Client(server.address, timeout=60) as slow:
        big = {"w": np.arange(1 << 16, dtype=np.float32)}  # past the small-fetch size: a pool region
        for data in (values(), big):
            p = slow.dict(data)
            read, tag = fast.dict(p, with_etag=True)
            assert fast._shm is not None and tag == slow.etag(p) == slow.dict(p, with_etag=True)[1]
            assert all(np.array_equal(read[k], v) for k, v in data.items())
            fast.dict(p, "w", data["w"] + 1, etag=tag)
            with pytest.raises(AbortedError):
                fast.dict(p, "w", data["w"], etag=tag)


def test_the_client_says_which_of_etag_and_with_etag_goes_where(client: Client) -> None:
    p = client.dict(values())
    with pytest.raises(TypeError, match="pass etag="):
        client.dict(p, "w", 1.0, with_etag=True)
    with pytest.raises(TypeError, match="pass with_etag=True"):
        client.dict(p, "w", etag=client.etag(p))
    with pytest.raises(TypeError, match="a new dictionary has no etag"):
        client.dict({"a": 1}, with_etag=True)
    with pytest.raises(TypeError, match="not int"):
        client.dict(p, "w", 1.0, etag=3)  # type: ignore[arg-type]


def test_clients_that_retry_on_aborted_lose_no_increment(live_server: LiveServer, client: Client) -> None:
    """Four clients each add 1 to a shared counter ten times by read, compute, write back with the etag
    read, reading again whenever they are ABORTED: the counter ends at exactly 40, however their calls
    interleave. Unconditional writes from the same reads lose increments when two clients read the
    same value (checked below with writes that race by design)."""
    p = client.dict({"count": np.zeros(1, np.float64)})

    def add_ones(times: int, conditional: bool, aborted: list[int]) -> None:
        with Client(live_server.address, timeout=60) as c:
            for _ in range(times):
                while True:
                    value, tag = c.dict(p, "count", with_etag=True)
                    try:
                        c.dict(p, "count", value + 1, etag=tag if conditional else "")
                        break
                    except AbortedError:
                        aborted.append(1)

    aborted: list[int] = []
    threads = [threading.Thread(target=add_ones, args=(10, True, aborted)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.dict(p, "count").tolist() == [40.0]

    # the same reads and writes without the etag, two clients made to read the same value first
    client.dict(p, "count", np.zeros(1, np.float64))
    read = [client.dict(p, "count"), client.dict(p, "count")]
    for value in read:
        client.dict(p, "count", value + 1)
    assert client.dict(p, "count").tolist() == [1.0]  # one increment lost
