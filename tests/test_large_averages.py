"""Averages large enough for the server's native CPU kernel (domain/lerp.py), through a real server:
each equals torch's own `lerp_` on the same numbers in this process, bit for bit. A running
average and an EMA of a float32 module, and an EMA of a bfloat16 module kept in float32; both run
whichever kernel the server has (the start-up log says which), so they hold with it and without."""

from __future__ import annotations

import numpy as np
import torch

from weightavg import Client
from weightavg_server.domain import lerp

NET = ["sequential", ["linear", 512, 384], ["linear", 384, 256]]
"""Two weights of 196608 and 98304 elements: both past the kernel's threshold, in one flat buffer."""
assert 384 * 256 >= lerp.MIN_ELEMENTS


def params(c: Client, m: object) -> dict[str, torch.Tensor]:
    d = c.copyparms(m)
    values = {name: _tensor(np.array(value)) for name, value in c.dict(d).items() if name != ".n"}
    c.free(d)
    return values


def _tensor(a: np.ndarray) -> torch.Tensor:
    """numpy to torch; a bfloat16 array (ml_dtypes) by its bits."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def scramble(c: Client, m: object, seed: int) -> None:
    """New parameters for m, drawn here so the expectation can be computed from them."""
    g = torch.Generator().manual_seed(seed)
    for name, value in params(c, m).items():
        c.parm(m, name, (torch.randn(value.shape, generator=g, dtype=torch.float64) * 2 + 0.5).numpy().astype(np.float32))


def test_a_large_running_average_is_torchs_lerp_bit_for_bit(client: Client) -> None:
    m = client.module(NET)
    d = client.copyparms(m)
    expected = params(client, m)
    for n in range(2, 5):
        scramble(client, m, seed=n)
        for name, value in params(client, m).items():
            expected[name].lerp_(value, 1.0 / n)
        assert client.avgparms(m, d) == n
    got = client.dict(d)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name].view(np.int32), value.numpy().view(np.int32), err_msg=name)


def test_a_large_ema_of_a_bfloat16_module_kept_in_float32_is_torchs_bit_for_bit(client: Client) -> None:
    m = client.module(NET)
    scramble(client, m, seed=1)
    client.to(m, dtype="bfloat16")
    e = client.copyparms(m, dtype="float32")
    expected = {name: value.float() for name, value in params(client, m).items()}
    decay = 0.9
    assert client.ema(m, e, decay=decay) == 1  # the first step copies
    for step in range(2, 5):
        scramble(client, m, seed=step)  # the server casts the float32 values to the module's bfloat16
        for name, value in params(client, m).items():
            assert value.dtype == torch.bfloat16
            expected[name].lerp_(value.float(), 1 - decay)
        assert client.ema(m, e, decay=decay) == step
    got = client.dict(e)
    for name, value in expected.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name].view(np.int32), value.numpy().view(np.int32), err_msg=name)
