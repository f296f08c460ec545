"""The books against the memory, after long mixed sequences of calls through a real server.

After every call the store's charge must equal three things found apart from it: the walk of every
live object (`walked_bytes`), the storage those objects keep alive through any Python reference
(`referenced_bytes`, which does not ask the objects what they hold), and the default tenant's usage;
no reservation may be left behind; a call refused at a squeezed cap, or failed for any reason,
changes no object; and once everything is freed both come back to nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from conftest import LiveServer
from inprocess import assert_nothing_pending, referenced_bytes, walked_bytes
from weightavg import Client
from weightavg_server.store.limits import Limits
from weightavg_server.store.registry import Registry

ROOM = 10**9
"""The cap between calls: far above what the tests hold, so that `assert_nothing_pending` can see
the whole room above the charge."""


def assert_books_exact(registry: Registry) -> None:
    registry.set_limits(Limits(max_device_bytes=ROOM))
    held = registry.held_bytes()
    assert held == walked_bytes(registry) == referenced_bytes(registry)
    assert registry.tenant_usage().get("default") is None or registry.tenant_usage()["default"].nbytes == held
    assert_nothing_pending(registry)


@pytest.fixture
def server(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server()


def test_a_view_charges_the_gradients_its_parameters_keep(server: LiveServer) -> None:
    """A view of a module's parameters holds the parameters, and each keeps its `.grad`: once the
    model is freed the view alone keeps the gradients the last epoch left. They went uncharged (found
    by review: 420 bytes charged, 840 held)."""
    layer = (20 * 5 + 5) * 4
    with Client(server.address, timeout=60) as c:
        q = c.module(["linear", 20, 5])
        m = c.model(q, c.loss("ce"), c.opt("sgd", q, 0.1))
        c.train(m, np.ones((10, 20), np.float32), np.zeros(10, np.int64))
        c.run(m)
        c.parms(m)
        c.free(m)
        assert server.registry.held_bytes() == {"cpu": 2 * layer}
        assert_books_exact(server.registry)
        c.purge()
    assert server.registry.held_bytes() == {} == referenced_bytes(server.registry)


def test_a_running_average_s_count_goes_with_its_entry(server: LiveServer) -> None:
    """An average keeps its own '.n' to write counts into; deleted, or replaced by an upload, the
    entry was gone but the dictionary still kept the old tensor alive, uncharged (found by review)."""
    with Client(server.address, timeout=60) as c:
        q = c.module(["linear", 20, 5])
        d = c.copyparms(q)
        assert c.avgparms(q, d) == 2 and c.avgparms(q, d) == 3
        c.delete(d, ".n")
        assert_books_exact(server.registry)
        assert c.avgparms(q, d) == 2
        c.dict(d, ".n", 7.0)
        assert_books_exact(server.registry)
        assert c.avgparms(q, d) == 8
        assert_books_exact(server.registry)
