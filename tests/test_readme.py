"""The README's Python examples, run as they stand against a real server (only the address replaced):
they print plain Python values, their returns are what the verb table says, and they leave nothing
on the server."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from conftest import LiveServer
from weightavg import Client

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _run(block: str, server: LiveServer) -> str:
    assert '"127.0.0.1:50051"' in block
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.replace('"127.0.0.1:50051"', repr(server.address)), "README.md", "exec"), {})
    return out.getvalue()


def test_the_quick_start_prints_plain_values_and_frees_what_it_made(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    assert _run(_python_blocks()[0], server) == "2\n2.0\n{'weight': True, 'bias': True}\n1\n"
    assert len(server.registry) == 0


def test_the_training_example_runs_the_swa_recipe_and_frees_what_it_made(start_server) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("sklearn")
    server = start_server()
    lines = _run(_python_blocks()[1], server).split()
    assert lines[0] == "45"
    last, averaged = float(lines[1]), float(lines[2])
    assert 80.0 < last <= 100.0 and 80.0 < averaged <= 100.0
    assert len(server.registry) == 0


def test_the_objects_one_liner_frees_both_handles(live_server: LiveServer) -> None:
    """The README's objects example says the block frees the handles; written as `d = m.copy()` inside
    the block, it left the copy on the server."""
    text = " ".join((ROOT / "README.md").read_text().split())
    snippet = re.search(r"Objects sit on top of the verbs: `([^`]+)` frees both handles", text)
    assert snippet is not None
    with Client(live_server.address, timeout=120) as c:
        before = len(live_server.registry)
        exec(compile(snippet.group(1), "README.md", "exec"), {"c": c})
        assert len(live_server.registry) == before


def _verb_rows() -> list[tuple[str, str]]:
    """The (RPC, client call) cells of the README's verb table."""
    text = (ROOT / "README.md").read_text().split("## Reference verbs, RPCs and client calls", 1)[1]
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 3 and not set(line) <= set("|- ") and cells[0] != "reference (ktorch)":
            rows.append((cells[1], cells[2]))
    return rows


def test_every_rpc_and_client_call_in_the_verb_table_exists_with_its_keywords() -> None:
    """The verb table names RPCs and shows client calls: each RPC is one of the service's, every
    service RPC is named (the table is the map of the API), and each `c.verb(..., key=...)` or
    `Client(..., key=...)` is a method taking those keywords, so a call copied from the table does
    not fail with a TypeError."""
    import inspect

    from weightavg.v1 import weightavg_pb2 as pb

    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["WeightAveragingService"].methods}
    rows = _verb_rows()
    assert len(rows) > 40
    named = {name for rpc, _ in rows for name in re.findall(r"`([A-Z][A-Za-z]+)`", rpc)}
    assert named - rpcs == set() and rpcs - named == set()
    calls = [call for _, cell in rows for call in re.findall(r"(?:c\.[a-z_]+|Client)\([^`]*?\)(?=`|$)", cell)]
    assert len(calls) > 50
    for call in calls:
        name, args = call.split("(", 1)
        function = Client.__init__ if name == "Client" else getattr(Client, name.removeprefix("c."))
        parameters = inspect.signature(function).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        for keyword in re.findall(r"(?<![=\w])([a-z_]+)=", args):
            assert takes_any or keyword in parameters, (call, keyword)
