"""Tensors cross the wire bit-exactly in every dtype, and large dictionaries stream past message caps."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from conftest import LiveServer
from weightavg import Client

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int8, np.uint8, np.int16,
          np.int32, np.int64, np.bool_, np.complex64, np.complex128]


def _random(dtype: object, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Arbitrary bit patterns (NaN payloads, infinities, subnormals included) for float types."""
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    raw = rng.integers(0, 256, int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_round_trips_bit_exactly(client: Client, dtype: object) -> None:
    rng = np.random.default_rng(0)
    values = {"matrix": _random(dtype, (3, 5), rng), "scalar": _random(dtype, (), rng),
              "empty": _random(dtype, (0, 4), rng)}
    p = client.dict(values)
    back = client.dict(p)
    for name, value in values.items():
        got = np.asarray(back[name])
        assert got.dtype == np.dtype(dtype) and got.shape == value.shape, name
        assert got.tobytes() == value.tobytes(), name
    t = client.tensor(values["matrix"])
    assert client.tensor(t).tobytes() == values["matrix"].tobytes()
    assert client.size(t) == (3, 5)


def test_half_precision_parameters_round_trip(client: Client) -> None:
    m = client.module(["linear", 8, 4])
    client.to(m, dtype="bfloat16")
    weight = client.parm(m, "weight")
    assert weight.dtype == ml_dtypes.bfloat16
    p = client.copyparms(m)
    assert client.dict(p, "weight").tobytes() == weight.tobytes()
    client.to(m, dtype="float16")
    client.parm(m, "weight", np.full((4, 8), 0.1, np.float16))
    assert client.parm(m, "weight").tobytes() == np.full((4, 8), 0.1, np.float16).tobytes()


@pytest.mark.slow
def test_300_megabyte_dictionary_round_trips(client: Client) -> None:
    rng = np.random.default_rng(1)
    values = {
        "big": _random(np.float32, (50_000_000,), rng),      # 200 MB in one tensor: 50 chunks
        "bf16": _random(ml_dtypes.bfloat16, (25_000_000,), rng),  # 50 MB
        "f16": _random(np.float16, (5000, 5000), rng),       # 50 MB
    }
    assert sum(v.nbytes for v in values.values()) >= 300_000_000
    p = client.dict(values)
    assert client.size(p) == {name: v.shape for name, v in values.items()}
    back = client.dict(p)
    for name, value in values.items():
        assert back[name].dtype == value.dtype
        assert np.array_equal(back[name].view(np.uint8), value.view(np.uint8)), name
    client.free(p)


def test_fetches_at_once_from_reused_reply_memory_each_get_their_own_bytes(live_server: LiveServer) -> None:
    """A fetch streams from copies in memory that later fetches reuse (domain/hostcache.py):
    clients fetching different dictionaries at once, over and over, each get exactly theirs, in every
    element size (the copies are packed largest elements first, whatever the entries' order)."""
    import threading

    rng = np.random.default_rng(2)
    dicts = [
        {"i8": _random(np.int8, (1001,), rng), "f64": _random(np.float64, (1000, 1501), rng),
         "bf16": _random(ml_dtypes.bfloat16, (4_000_001,), rng), "c128": _random(np.complex128, (3,), rng)},
        {"f32": _random(np.float32, (3 << 20,), rng), "bool": _random(np.bool_, (5,), rng),
         "i16": _random(np.int16, (3_000_000,), rng)},
    ]  # 20 and 18 MB: several messages each, so the replies stream side by side
    errors: list[str] = []
    with Client(live_server.address, timeout=120) as setup:
        handles = [setup.dict(values) for values in dicts]

        def fetch_repeatedly(k: int) -> None:
            with Client(live_server.address, timeout=120) as c:
                for _ in range(5):
                    back = c.dict(handles[k])
                    for name, value in dicts[k].items():
                        if back[name].dtype != value.dtype or back[name].tobytes() != value.tobytes():
                            errors.append(f"client {k}: {name}")

        threads = [threading.Thread(target=fetch_repeatedly, args=(k % 2,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        setup.free(*handles)
    assert errors == [] and not any(t.is_alive() for t in threads)


def test_a_shape_numpy_cannot_hold_is_refused_and_every_one_taken_is_fetched(live_server: LiveServer) -> None:
    """A tensor of no elements whose byte strides pass int64 ([0, 2**61] float64) was taken, since
    torch counts strides in elements, but numpy refuses it ('array is too big'): any client could
    send it, and no numpy client fetch it. Such a shape is refused as too many element strides are."""
    import grpc

    from weightavg import wire
    from weightavg.v1 import weightavg_pb2 as pb

    def create(shape: list[int], code: int) -> pb.CreateDictionaryResponse:
        chunk = pb.TensorChunk(name="e", dtype=code, shape=shape, tensor_count=1, total_bytes=0,  # type: ignore[arg-type]
                               crc32c=wire.tensor_crc("e", code, shape))
        with grpc.insecure_channel(live_server.address) as channel:
            call = channel.stream_unary(f"/{pb.DESCRIPTOR.services_by_name['WeightAveragingService'].full_name}/CreateDictionary",
                                        response_deserializer=pb.CreateDictionaryResponse.FromString)
            return call(iter([pb.CreateDictionaryRequest(chunk=chunk).SerializeToString()]), timeout=60)  # type: ignore[no-any-return]

    before = len(live_server.registry)
    for shape, code in (([0, 2**61], pb.DTYPE_FLOAT64), ([3, 0, 2**61], pb.DTYPE_FLOAT32), ([0, 2**62], pb.DTYPE_INT16)):
        with pytest.raises(grpc.RpcError) as err:
            create(shape, code)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "strides overflow int64" in err.value.details()
    assert len(live_server.registry) == before
    with Client(live_server.address, timeout=60) as c:
        for shape, code, dtype in (([0, 2**63 - 1], pb.DTYPE_INT8, np.int8), ([0, 2**62 - 1], pb.DTYPE_INT16, np.int16)):
            d = create(shape, code).dictionary
            got = c.dict(d.id, "e")
            assert got.dtype == dtype and got.shape == tuple(shape)
            c.free(d.id)
