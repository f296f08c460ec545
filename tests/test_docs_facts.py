"""Tables in docs/ that restate a fact of the code, checked against that code so they cannot go
stale: the options of `weightavg serve` (docs/ops.md) and the RPCs that take a request ID
(docs/robust.md). Both drifted once: two flags missing from the first, ten RPCs from the second."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from weightavg.v1 import weightavg_pb2 as pb
from weightavg_server.ops.cli import OPTIONS, SWITCHES
from weightavg_server.ops.config import ENV_PREFIX

ROOT = Path(__file__).resolve().parent.parent


def _table_rows(doc: str, header: str) -> list[list[str]]:
    """The cells of each row of the Markdown table whose header row starts with `header`."""
    text = (ROOT / "docs" / doc).read_text()
    after = text.split(header, 1)[1]
    rows = []
    for line in after.splitlines()[1:]:
        if not line.startswith("|"):
            break
        if not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_every_serve_option_is_in_the_ops_table_with_its_variable() -> None:
    rows = _table_rows("ops.md", "| flag | variable | default | meaning |")
    documented = {}
    for flags, variables, *_ in rows:
        for flag, variable in zip(_names(flags), _names(variables), strict=True):
            documented[flag] = variable.split("=")[0]
    names = [(flag, name) for flag, name, *_ in OPTIONS] + [(flag, name) for flag, name, _ in SWITCHES]
    expected = {flag: f"{ENV_PREFIX}{name.upper()}" for flag, name in names}
    assert documented == expected


def test_the_request_id_table_lists_every_rpc_once_on_the_right_side() -> None:
    service = pb.DESCRIPTOR.services_by_name["WeightAveragingService"]
    takes = {m.name for m in service.methods if "request_id" in m.input_type.fields_by_name}
    rows = _table_rows("robust.md", "| Takes `request_id` | Does not |")
    assert len(rows) == 1
    listed_takes, patterns = _names(rows[0][0]), _names(rows[0][1])
    assert sorted(listed_takes) == sorted(takes)
    others = {m.name for m in service.methods} - takes
    covered = {name for name in others if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    assert covered == others
    assert not [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in others)]  # no stale name


def test_the_request_id_field_number_the_docs_give_is_the_protos() -> None:
    """Other-language clients set the field by number only if they build messages by hand: the docs
    say 15, and name the one message where it is 11."""
    numbers = {
        m.input_type.name: m.input_type.fields_by_name["request_id"].number
        for m in pb.DESCRIPTOR.services_by_name["WeightAveragingService"].methods
        if "request_id" in m.input_type.fields_by_name
    }
    exceptions = {name: n for name, n in numbers.items() if n != 15}
    assert exceptions == {"UpdateMovingAverageRequest": 11}
    for doc in ("clients.md", "robust.md"):
        text = " ".join((ROOT / "docs" / doc).read_text().split())
        assert "field 15" in text and "`UpdateMovingAverageRequest`" in text, doc
