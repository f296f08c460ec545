"""Tables in docs/ that restate a fact of the code, checked against that code so they cannot go
stale: the options of `weightavg serve` (docs/ops.md) and the RPCs that take a request ID
(docs/robust.md). Both drifted once: two flags missing from the first, ten RPCs from the second.
Also the error table of docs/clients.md, comments of the .proto, error messages the docs quote and
example blocks of docs/merging.md and docs/models.md,
against a real server; and defaults, limits, sizes, metric families, layer types and module lists
the docs restate, against the constants and registries they come from."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from conftest import LiveServer
from weightavg import Client, InvalidArgumentError, wire
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.ops.cli import OPTIONS, SWITCHES
from weightavg_server.ops.config import (
    DEFAULT_MAX_SESSION_LEASE_SECONDS, DEFAULT_SESSION_LEASE_SECONDS, ENV_PREFIX, ServerConfig,
)

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


def test_every_default_in_the_ops_table_is_the_configs() -> None:
    """The default column of docs/ops.md's options table, against `ServerConfig()`: a number or
    name in backquotes is the field's value, "none"/"off" an empty or false one, and `--host` the
    metrics host that follows the gRPC host. The flags were checked, their defaults were not."""
    config = ServerConfig()
    for flags, _, default, *_ in _table_rows("ops.md", "| flag | variable | default | meaning |"):
        for flag in _names(flags):
            value = getattr(config, flag[2:].replace("-", "_"))
            quoted = _names(default)
            if not quoted:
                assert default.split(" ")[0] in ("none", "off") and not value, (flag, default, value)
            elif quoted[0].startswith("--"):
                assert (flag, quoted[0], value) == ("--metrics-host", "--host", ""), flag
            else:
                assert type(value)(quoted[0]) == value, (flag, default, value)


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


def test_the_clients_error_table_gives_the_code_a_server_answers_for_bad_streams(client: Client) -> None:
    """docs/clients.md's error table, for the two ways a declared tensor stream goes wrong, against a
    real server fed raw messages: a stream short of what it declared is INVALID_ARGUMENT and a checksum
    that does not match is DATA_LOSS, and each case is in that code's row and no other. The table once
    put a declared size that does not match under DATA_LOSS."""
    rows = {_names(code)[0]: text for code, text, _ in _table_rows("clients.md", "| code | when | what to do |")}
    data = b"\0" * 4
    crc = wire.crc32c(data, wire.tensor_crc("w", pb.DTYPE_FLOAT32, [1]))
    cases = {  # keyword of the case in the table -> the stream
        "fewer or more tensors or bytes than it declared": pb.TensorChunk(
            name="w", dtype=pb.DTYPE_FLOAT32, shape=[1], data=data, tensor_count=2, total_bytes=8, crc32c=crc),
        "CRC-32C does not match": pb.TensorChunk(
            name="w", dtype=pb.DTYPE_FLOAT32, shape=[1], data=data, tensor_count=1, total_bytes=4, crc32c=crc ^ 1),
    }
    with grpc.insecure_channel(client.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        for keyword, chunk in cases.items():
            with pytest.raises(grpc.RpcError) as err:
                stub.CreateDictionary(iter([pb.CreateDictionaryRequest(chunk=chunk)]), timeout=30)
            code = err.value.code().name
            assert [c for c, text in rows.items() if keyword in text] == [code], (keyword, err.value.details())


def _proto_comment(block: str, field: str) -> str:
    """The comment lines just above `field` (e.g. "double lease_seconds = 2;") inside the .proto's
    `message`/`enum` block named `block`, joined into one line."""
    text = (ROOT / "proto" / "weightavg" / "v1" / "weightavg.proto").read_text()
    body = re.split(rf"^(?:message|enum) {block} {{\n", text, maxsplit=1, flags=re.M)[1].split("\n}", 1)[0]
    lines = body.split(field, 1)[0].splitlines()
    comment = []
    for line in reversed(lines[:-1] if not lines[-1].strip() else lines):
        if not line.strip().startswith("//"):
            break
        comment.insert(0, line.strip().removeprefix("//").strip())
    return " ".join(comment)


def test_proto_comments_on_leases_and_splits_say_what_the_server_does(client: Client) -> None:
    """What a client generated from the .proto reads about defaults and limits is what a real server
    does: a lease over the maximum is refused (the comment said the server may cap it), and an unset
    DataSplit is refused by some calls and read as the training data by others (the comment said it
    is never valid)."""
    asked = _proto_comment("CreateSessionRequest", "double lease_seconds = 1;")
    granted = _proto_comment("CreateSessionResponse", "double lease_seconds = 2;")
    assert f"{DEFAULT_SESSION_LEASE_SECONDS:g}" in asked and f"{DEFAULT_MAX_SESSION_LEASE_SECONDS:g}" in asked
    assert "INVALID_ARGUMENT" in asked and "cap" not in granted
    unset = _proto_comment("DataSplit", "DATA_SPLIT_UNSPECIFIED = 0;")
    assert "Never valid" not in unset and "RestoreModelData" in unset and "GetModelOptions" in unset
    with grpc.insecure_channel(client.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        over = pb.CreateSessionRequest(lease_seconds=DEFAULT_MAX_SESSION_LEASE_SECONDS + 1)
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateSession(over, timeout=30)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        reply = stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
        assert reply.lease_seconds == DEFAULT_SESSION_LEASE_SECONDS
        stub.CloseSession(pb.CloseSessionRequest(session=reply.session), timeout=30)
        model = client.model(m := client.module(["linear", 1, 2]), client.loss("ce"), client.opt("sgd", m))
        with pytest.raises(grpc.RpcError) as err:
            stub.GetModelOptions(pb.GetModelOptionsRequest(model=model.id), timeout=30)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert stub.RestoreModelData(pb.RestoreModelDataRequest(model=model.id), timeout=30).size == -1


def _doc_text(doc: str) -> str:
    """A doc's prose, fenced blocks left out, with its line breaks folded to spaces, so a quote
    wrapped over two lines still matches."""
    return " ".join(re.sub(r"```.*?```", " ", (ROOT / "docs" / doc).read_text(), flags=re.S).split())


def _quoted(doc: str, start: str) -> str:
    """The backquoted message in `doc` that starts with `start`."""
    found = [q for q in re.findall(r"`([^`]+)`", _doc_text(doc)) if q.startswith(start)]
    assert len(found) == 1, (doc, start, found)
    return found[0]


def _matches(quote: str, message: str) -> bool:
    """Whether `message` holds `quote`, where " ... " in the quote stands for any text."""
    return re.search(".*".join(re.escape(part) for part in quote.split(" ... ")), message) is not None


def test_error_messages_the_docs_quote_are_the_servers(client: Client) -> None:
    """Messages docs/models.md and docs/merging.md quote, word for word, against a real server: the
    merging doc's quote of an unknown option lacked the "did you mean" the server adds, and a bad
    label in the batch run probes got torch's "Target 9 is out of bounds." instead of the quote."""
    def refusal(call: Any) -> str:
        with pytest.raises(InvalidArgumentError) as err:
            call()
        return str(err.value.message)

    q = client.module(["linear", 3, 4])
    m = client.model(q, client.loss("ce"), client.opt("sgd", q))
    labels = np.zeros(20, dtype=np.int64)
    labels[7] = 9
    client.train(m, np.zeros((20, 3), dtype=np.float32), labels)  # one batch of 20: the probed one
    q1 = client.module(["linear", 4, 1])
    m1 = client.model(q1, client.loss("mse"), client.opt("sgd", q1))
    d = client.copyparms(m)
    cases = {
        ("models.md", "y (targets) is float64"): lambda: client.train(m, np.zeros((60, 3)), np.zeros(60)),
        ("models.md", "target 9 of sample 7"): lambda: client.run(m),
        ("models.md", "run: targets of shape"): lambda: client.run(
            m1, np.zeros((20, 4), dtype=np.float32), np.zeros(20, dtype=np.float32)),
        ("models.md", "tensor size mismatch"): lambda: client.train(
            m, np.zeros((100, 3), dtype=np.float32), np.zeros(10, dtype=np.int64)),
        ("merging.md", "ties: unknown option"): lambda: client.merge("ties", [d, d], base=d, densty=0.2),
    }
    for (doc, start), call in cases.items():
        quote, message = _quoted(doc, start), refusal(call)
        assert _matches(quote, message), (doc, quote, message)


def test_the_sessions_convention_in_the_clients_doc_works_through_the_generated_stub(live_server: LiveServer) -> None:
    """docs/clients.md tells authors in other languages how to use a session without the Python
    client: CreateSession, its id as `weightavg-session` metadata, KeepAliveSession with an empty
    session, FreeHandles with `all`, CloseSession. Done here with raw messages against a real server."""
    text = _doc_text("clients.md")
    for name in ("CreateSession", "`weightavg-session` metadata", "KeepAliveSession", "CloseSession", "`all`"):
        assert name in text, name
    spec = pb.LayerSpec(type="linear", args=[pb.OptionValue(int_value=2), pb.OptionValue(int_value=1)])
    with grpc.insecure_channel(live_server.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        session = stub.CreateSession(pb.CreateSessionRequest(), timeout=30).session
        meta = (("weightavg-session", session),)
        kept = stub.CreateModule(pb.CreateModuleRequest(spec=spec), timeout=30, metadata=meta).module.id
        freed = stub.CreateModule(pb.CreateModuleRequest(spec=spec), timeout=30, metadata=meta).module.id
        outside = stub.CreateModule(pb.CreateModuleRequest(spec=spec), timeout=30).module.id
        assert stub.KeepAliveSession(pb.KeepAliveSessionRequest(), timeout=30, metadata=meta).lease_seconds > 0
        with pytest.raises(grpc.RpcError) as err:
            stub.FreeHandles(pb.FreeHandlesRequest(all=True), timeout=30)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert stub.FreeHandles(pb.FreeHandlesRequest(handles=[freed]), timeout=30, metadata=meta).freed == 1
        assert stub.FreeHandles(pb.FreeHandlesRequest(all=True), timeout=30, metadata=meta).freed == 1
        assert kept not in {h for h, _ in live_server.registry.items()}
        stub.CloseSession(pb.CloseSessionRequest(), timeout=30, metadata=meta)
        assert stub.FreeHandles(pb.FreeHandlesRequest(handles=[outside]), timeout=30).freed == 1


def _python_blocks(doc: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / doc).read_text(), re.S)


def test_the_merging_docs_average_and_merge_calls_run_as_written(client: Client) -> None:
    """docs/merging.md's `average` and `merge` blocks, run as they stand on dictionaries of one
    two-layer model (its `head.*` and `*.bias` entries are what the per-tensor patterns name): every
    call is accepted and makes a dictionary, and `into=g` writes the mean of g and two others into g."""
    q = client.module(["sequential", ["linear", "body", 4, 3], ["linear", "head", 3, 2]])
    names: dict[str, Any] = {"c": client}
    for i, name in enumerate(["d1", "d2", "d3", "b", "a", "g"]):
        names[name] = client.copyparms(q)
        client.dict(names[name], "head.bias", np.full(2, float(i), dtype=np.float32))
    average, merges = _python_blocks("merging.md")[:2]
    exec(compile(average, "merging.md", "exec"), names)
    assert client.dict(names["avg"], "head.bias").tolist() == [0.5, 0.5]  # (0 * 600 + 1 * 300 + 2 * 100) / 1000
    assert client.dict(names["g"], "head.bias").tolist() == [2.0, 2.0]  # (5 + 0 + 1) / 3
    lines = [line for line in merges.splitlines() if line.strip()]
    assert len(lines) == 3
    for line in lines:
        merged = eval(line, names)  # each line is one call
        assert client.size(merged).keys() >= {"body.weight", "head.bias"}, line


def test_the_models_docs_objects_block_runs_and_frees_what_it_made(live_server: LiveServer, client: Client) -> None:
    """docs/models.md's "Objects over the verbs" block, run as it stands: `average_into` returns the
    count its comment gives, and the `with` block frees both handles."""
    block = _python_blocks("models.md")[1]
    assert block.startswith("with c.Module(")
    body = block.replace("q.average_into(avg)", "counts.append(q.average_into(avg))", 1)
    before = len(live_server.registry)
    names: dict[str, Any] = {"c": client, "counts": []}
    exec(compile(body, "models.md", "exec"), names)
    assert names["counts"] == [2] and "-> 2" in block
    assert len(live_server.registry) == before


def test_the_messages_with_optional_fields_are_the_ones_the_clients_doc_counts() -> None:
    """docs/clients.md warns that proto3 `optional` fields need protoc 3.15; it named only `Momentum`
    when ten messages had them."""
    having = sorted(
        message.name for message in pb.DESCRIPTOR.message_types_by_name.values()
        if any(o.name.startswith("_") and len(o.fields) == 1 for o in message.oneofs)  # synthetic oneofs
    )
    named = ["Momentum", "TensorChunk", "UpdateMovingAverageRequest"]
    assert set(named) <= set(having)
    others = {7: "seven"}.get(len(having) - len(named), "(update docs/clients.md)")
    assert f"(in `Momentum`, `TensorChunk`, `UpdateMovingAverageRequest` and {others} other messages) need protoc 3.15" \
        in _doc_text("clients.md"), having


def test_the_atomicity_cases_robust_md_lists_are_the_tests() -> None:
    """docs/robust.md says which RPCs `test_failed_call_changes_nothing` fails and about how many
    cases it runs; it said about 100 cases over 13 RPCs when there were 201 over 19."""
    import test_atomicity

    source = (ROOT / "tests" / "test_atomicity.py").read_text()
    tested = set(re.findall(r'(?:unary|streamed)\("([A-Za-z]+)"', source))
    text = _doc_text("robust.md")
    sentence = text.split("`tests/test_atomicity.py::test_failed_call_changes_nothing` runs about ", 1)[1]
    count, listed = sentence.split(" cases: ", 1)[0], sentence.split(" cases: ", 1)[1].split(", each with", 1)[0]
    assert set(re.findall(r"[A-Z][A-Za-z]+", listed)) == tested
    assert abs(int(count) - len(test_atomicity.CASES)) <= 0.25 * len(test_atomicity.CASES)


def test_the_architecture_diagram_names_every_module_of_each_layer() -> None:
    """docs/architecture.md's diagram lists the modules of `transport/`, `store/`, `domain/` and `ops/`
    inside that layer's box: a module added to a layer without a word in the diagram fails here, as
    does a name left behind by a module that is gone."""
    diagram = re.findall(r"```\n(.*?)```", (ROOT / "docs" / "architecture.md").read_text(), re.S)[0]
    boxes = re.split(r"^\s*[├└].*$", diagram, flags=re.M)
    package = ROOT / "server" / "weightavg_server"
    for layer in ("transport", "store", "domain", "ops"):
        [box] = [b for b in boxes if re.search(rf"^\s*│? ?{layer}/", b, re.M)]
        words = set(re.findall(r"[a-z_]+", box.replace(f"{layer}/", " ")))
        modules = {p.stem for p in (package / layer).glob("*.py") if p.stem != "__init__"}
        assert modules <= words, (layer, sorted(modules - words))
    for word in ("cluster", "service"):
        assert (package / f"{word}.py").exists() and f"{word}.py" in (ROOT / "docs" / "architecture.md").read_text()


def test_the_move_dtype_comment_says_what_a_real_server_converts(client: Client) -> None:
    """MoveHandleRequest.dtype said "for floating-point tensors": a tensor handle of integers is
    converted too, a complex target is taken, and a move that would lose values is refused. What the
    comment now says, against a real server."""
    comment = _proto_comment("MoveHandleRequest", "Dtype dtype = 3;")
    for claim in ("floating or complex", "A tensor handle converts whatever its dtype", "a dictionary its floating entries",
                  "INVALID_ARGUMENT, nothing moved"):
        assert claim in comment, claim
    t = client.tensor(np.arange(3, dtype=np.int64))
    client.to(t, dtype="float32")
    assert client.tensor(t).dtype == np.float32
    d = client.dict({"i": np.arange(3, dtype=np.int64), "f": np.ones(2, np.float32)})
    client.to(d, dtype="complex64")
    assert {k: v.dtype for k, v in client.dict(d).items() if k != ".n"} == {"i": np.int64, "f": np.complex64}
    big = client.tensor(np.array([70000], dtype=np.int64))
    for dtype in ("int32", "float16"):  # the dtype named as the client names it (it said torch.int32)
        with pytest.raises(InvalidArgumentError, match="nothing moved" if dtype == "float16" else "floating or complex, not int32;"):
            client.to(big, dtype=dtype)
    assert client.tensor(big).tolist() == [70000]


def test_the_clients_error_table_has_a_row_for_every_code_the_server_answers_and_the_client_maps() -> None:
    """docs/clients.md's error table against the code: every status a domain error names
    (`domain/errors.py`), UNAUTHENTICATED (the token interceptor), and every code the Python client
    has an exception for, UNIMPLEMENTED included (grpc's own answer to a method it lacks: an older
    server), has a row; and no row names a code nothing answers."""
    from weightavg import _errors
    from weightavg_server.domain import errors

    rows = {code for cell, *_ in _table_rows("clients.md", "| code | when | what to do |") for code in _names(cell)}
    raised = {c.code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.WeightavgError)}
    mapped = set(_errors._BY_CODE)
    assert rows == raised | {"UNAUTHENTICATED", "UNIMPLEMENTED"} == mapped


def test_the_readmes_install_lines_name_what_pip_installs() -> None:
    """README.md's `pip install weightavg` comment lists the thin client's dependencies, and the
    server line the torch it pins: it left out grpcio-health-checking, which `weightavg health` uses."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the project supports 3.10

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    install = (ROOT / "README.md").read_text().split("## Install", 1)[1].split("## ", 1)[0]
    client_line = " ".join(install.split("pip install 'weightavg[server]'", 1)[0].split())
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0]
        assert re.search(rf"[ :,]{re.escape(name)}[,) ]", client_line), name
    [torch] = [r for r in project["optional-dependencies"]["server"] if r.startswith("torch")]
    assert torch in install and f"torch {torch.split('==')[1]}" in install


def test_the_limits_table_of_robust_md_gives_the_configs_defaults() -> None:
    """docs/robust.md's limits table writes defaults for people ("64 MiB", "1,000,000"): each is
    the `ServerConfig()` default of the flag in its row, and each flag's variable is the right one."""
    config = ServerConfig()
    units = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    rows = _table_rows("robust.md", "| Cap | Flag / variable | Default | Over it |")
    assert len(rows) >= 7
    for _, flags, default, _ in rows:
        flag, variable = _names(flags)[:2]
        name = flag[2:].replace("-", "_")
        assert variable == f"{ENV_PREFIX}{name.upper()}", flag
        match = re.match(r"([\d,]+) ?(KiB|MiB|GiB|TiB)?", default)
        assert match, (flag, default)
        number, unit = match.groups()
        assert int(number.replace(",", "")) * units[unit or ""] == getattr(config, name), (flag, default)


def test_the_ops_docs_numbers_are_the_codes_constants() -> None:
    """Figures docs/ops.md gives in prose, each beside the constant it restates: the metrics
    endpoint's connections and socket timeout, the histogram's range, the host memory kept for
    replies and staging, the locked-region cap, and the calls in flight per worker."""
    from weightavg_server.domain import hostcache, pinned
    from weightavg_server.ops import metrics
    from weightavg_server.transport.stats import LATENCY_BUCKETS

    text = _doc_text("ops.md")
    gib = 1 << 30
    facts = [
        f"It serves {metrics.SCRAPES_AT_ONCE} connections at once (`metrics.SCRAPES_AT_ONCE`",
        f"closes a connection silent for {metrics.SCRAPE_TIMEOUT_SECONDS:g} s",
        f"buckets {LATENCY_BUCKETS[0] * 1000:g} ms … {LATENCY_BUCKETS[-1]:g} s",
        f"`--host-cache-bytes` ({hostcache.CACHE_BYTES // gib} GiB by default",
        f"idle for {hostcache.IDLE_SECONDS:g} s",
        f"`--pinned-cache-bytes` ({pinned.CACHE_BYTES // gib} GiB by default",
        f"({pinned.LOCKED_BYTES // gib} GiB by default, `pinned.LOCKED_BYTES`)",
    ]
    assert [fact for fact in facts if fact not in text] == []
    app = (ROOT / "server" / "weightavg_server" / "ops" / "app.py").read_text()
    times = re.search(r"maximum_concurrent_rpcs=config\.max_workers \* (\d+)", app)
    assert times and f"beyond {times.group(1)}x this many calls in flight" in text


def test_the_merging_docs_outer_step_round_runs_as_written(client: Client) -> None:
    """docs/merging.md's round of federated training (two clients' models trained on the server, their
    average stepped into the global model by DiLoCo's outer optimizer), run as it stands for two
    rounds: it called testrun on a global model given no test data, FAILED_PRECONDITION."""
    block = next(b for b in _python_blocks("merging.md") if "for round in range(10):" in b)
    spec = ["sequential", ["linear", "a", 4, 8], "relu", ["linear", "d", 8, 3]]
    rng = np.random.default_rng(0)
    x, y = rng.random((60, 4), dtype=np.float32), rng.integers(0, 3, 60)
    models = []
    for i in range(2):
        q = client.module(spec)
        models.append(m := client.model(q, client.loss("ce"), client.opt("sgd", q, 0.05)))
        client.train(m, x[i * 30:(i + 1) * 30], y[i * 30:(i + 1) * 30])
    names: dict[str, Any] = {
        "c": client, "q": client.module(spec), "client_models": models, "shard_sizes": [30, 30], "X": x, "Y": y,
    }
    exec(compile(block.replace("range(10)", "range(2)"), "merging.md", "exec"), names)
    assert client.testrun(names["g"]) >= 0


def test_the_cluster_docs_allreduce_sizes_are_the_collectives_constants() -> None:
    """docs/cluster.md's allreduce: the size from which a tensor is reduced in place and the bucket
    size of smaller ones, against `domain/collectives.py` (the bucket was quoted as 25 MB: 25 MiB)."""
    from weightavg_server.domain import collectives

    text = _doc_text("cluster.md")
    assert f"a tensor of {collectives.INPLACE_BYTES >> 10} KiB or more is reduced in place" in text
    assert f"flattened into {collectives.BUCKET_BYTES >> 20} MiB buckets" in text
    assert collectives.INPLACE_BYTES % (1 << 10) == collectives.BUCKET_BYTES % (1 << 20) == 0


def test_the_shared_memory_figures_of_security_md_are_the_constants() -> None:
    """docs/security.md's shared memory section: the upload size from which bytes go through a region,
    the fetch size from which a pooled region is lent, the regions one session may hold (it was not
    documented) and the server's cap on regions, against the client's and the store's constants."""
    from weightavg import _shm
    from weightavg_server.store import shm

    text = _doc_text("security.md")
    facts = [
        f"from {_shm.MIN_UPLOAD_BYTES >> 10} KiB) then carries only headers",
        f"(tensors under {_shm.SHARED_MIN_TENSOR_BYTES >> 10} KiB travel in the stream's own messages among them)",
        f"A fetch over {_shm.SMALL_FETCH_BYTES >> 20} MiB is written into one of the client's pooled regions",
        f"(`pool0.<tag>`..`pool{len(_shm.POOL_NAMES) - 1}.<tag>`)",
        f"A session holds at most {shm.MAX_REGIONS_PER_SESSION} regions (`MAX_REGIONS_PER_SESSION`",
        f"an eighth of its open-files limit in regions (each keeps two descriptors), and {shm.MAX_REGIONS:,}",
    ]
    assert [fact for fact in facts if fact not in text] == []


def test_the_free_handles_comments_name_every_combination_a_server_refuses(live_server: LiveServer) -> None:
    """FreeHandlesRequest's comments say which of handles, `all`, `tenant` and `purge` go together:
    none do. Every pair is INVALID_ARGUMENT with nothing freed, on a real server and in a session (the
    purge comment did not name the tenant)."""
    for field, others in {"bool all = 2;": ["handles"], "string tenant = 20;": ["handles", "`all`"],
                          "bool purge = 3;": ["handles", "`all`", "tenant"]}.items():
        comment = _proto_comment("FreeHandlesRequest", field)
        assert "INVALID_ARGUMENT, nothing freed" in comment and all(o in comment for o in others), field
    with grpc.insecure_channel(live_server.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        session = stub.CreateSession(pb.CreateSessionRequest(), timeout=30).session
        meta = (("weightavg-session", session),)
        kept = stub.CreateTensor(iter([pb.CreateTensorRequest(chunk=pb.TensorChunk(
            dtype=pb.DTYPE_FLOAT32, shape=[1], data=b"\0" * 4))]), timeout=30, metadata=meta).tensor.id
        parts: dict[str, dict[str, Any]] = {
            "handles": {"handles": [kept]}, "all": {"all": True}, "tenant": {"tenant": "default"}, "purge": {"purge": True},
        }
        names = list(parts)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                with pytest.raises(grpc.RpcError) as err:
                    stub.FreeHandles(pb.FreeHandlesRequest(**parts[first], **parts[second]), timeout=30, metadata=meta)
                assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (first, second, err.value.details())
        assert kept in {h for h, _ in live_server.registry.items()}
        stub.CloseSession(pb.CloseSessionRequest(), timeout=30, metadata=meta)


def _option_text(option: Any) -> str:
    """An option as the layer table of docs/models.md writes it: its name, then its default if any."""
    default = option.opt.default
    if option.opt.required:
        return str(option.opt.name)
    if isinstance(default, bool):
        default = "true" if default else "false"
    elif default is None:
        default = "none"
    elif isinstance(default, tuple):
        default = list(default)
    elif isinstance(default, str):
        default = f'"{default}"'  # gelu's "none" is a string, not None
    return f"{option.opt.name} {default}"


def test_the_layer_table_of_models_md_is_the_servers_allowlist_with_its_options(client: Client) -> None:
    """docs/models.md's layer types, against the spec registry (type, torch class, options in
    positional order with their defaults) and against what a real server lists: no document listed
    the layer types or their options at all."""
    from weightavg_server.domain import specs

    rows = _table_rows("models.md", "| type | torch class | options (default) |")
    expected = [
        [f"`{t.name}`", f"`{t.module_class.__name__}`", ", ".join(_option_text(o) for o in t.options) or "(none)"]
        for t in specs._TYPES
    ]
    assert rows == expected
    assert sorted(_names(row[0])[0] for row in rows) == sorted(client.info()["layer_types"])
    text = _doc_text("models.md")
    for alias, name in specs._ALIASES.items():
        assert f"`{alias}` is taken for `{name}`" in text


def test_the_buffer_modes_follow_averaged_model_as_the_docs_say(client: Client) -> None:
    """BufferMode's COPY comment and docs/averaging.md's "copy" row name AveragedModel's
    use_buffers=False, which copies the source's buffers at every update; the default leaves them
    as they are (the table once gave use_buffers=False alone for it). Checked with torch's
    AveragedModel in process and the same updates on a real server."""
    import torch
    from torch.optim.swa_utils import AveragedModel

    assert "use_buffers=False" in _proto_comment("BufferMode", "BUFFER_MODE_COPY = 3;")
    rows = {_names(mode)[0]: like for mode, _, _, like in _table_rows("averaging.md", "| `buffers=` |")}
    assert "use_buffers=False)` before `update_bn`" in rows['"copy"'] and "once `update_bn` has run" in rows["False"]
    local = torch.nn.BatchNorm1d(2)
    averaged = AveragedModel(local, use_buffers=False)
    local.running_mean.fill_(5.0)
    averaged.update_parameters(local)
    q = client.module(["batchnorm1d", 2])
    default, copied = client.copyparms(q, buffers=True), client.copyparms(q, buffers=True)
    client.dict(client.buffers(q), "running_mean", 5.0)
    client.avgparms(q, default)
    client.avgparms(q, copied, buffers="copy")
    assert client.dict(copied, "running_mean").tolist() == averaged.module.running_mean.tolist() == [5.0, 5.0]
    assert client.dict(default, "running_mean").tolist() == [0.0, 0.0]


def test_the_metrics_table_of_ops_md_lists_what_the_collector_serves() -> None:
    """docs/ops.md's metrics table against one scrape's families from the server's own collector (on
    a CPU service, which has no CUDA gauge): every family it yields, with its Prometheus type and
    labels, has a row, and every row but the CUDA gauge and `process_*` is a family it yields."""
    import torch

    from weightavg_server.ops.metrics import WeightavgCollector
    from weightavg_server.service import Service, Settings
    from weightavg_server.store.registry import Registry
    from weightavg_server.transport.stats import RpcStats

    service = Service(Registry(), Settings(
        device=torch.device("cpu"), max_spec_depth=32, session_lease_seconds=60.0, max_session_lease_seconds=86400.0))
    families = {f"{m.name}_total" if m.type == "counter" else m.name: m for m in WeightavgCollector(RpcStats(), service).collect()}
    documented = {}
    table = (ROOT / "docs" / "ops.md").read_text().split("| metric | type | labels | what |\n|---|---|---|---|\n", 1)[1]
    for line in table.split("\n\n", 1)[0].splitlines():  # cells may be empty: split by hand
        names, kind, labels = [cell.strip() for cell in line.strip().strip("|").split("|")][:3]
        for name in _names(names):
            documented[name] = (kind.split(" ")[0], sorted(label.strip() for label in labels.split(",") if label.strip()))
    assert documented.keys() - families.keys() == {"process_*", "weightavg_cuda_memory_allocated_bytes"}
    for name, family in families.items():
        labels = sorted({key for sample in family.samples for key in sample.labels} - {"le"})
        assert documented[name][0] == family.type and (not family.samples or documented[name][1] == labels), name


def test_the_streaming_table_of_clients_md_lists_every_streaming_rpc_with_its_direction() -> None:
    """docs/clients.md's "How each RPC uses it" table against the service: every RPC that streams
    has a row whose direction is the proto's, and no row names a unary RPC."""
    directions = {(True, False): "client stream", (False, True): "server stream", (True, True): "bidirectional"}
    streaming = {
        m.name: directions[m.client_streaming, m.server_streaming]
        for m in pb.DESCRIPTOR.services_by_name["WeightAveragingService"].methods
        if m.client_streaming or m.server_streaming
    }
    documented = {name: row[1] for row in _table_rows("clients.md", "| RPC | direction | stream content |")
                  for name in _names(row[0])}
    assert documented == streaming


def _cited_tests() -> set[str]:
    """Every `test_...` name docs/*.md and README.md give, with its `.py` or `::` part if it has one;
    a name followed by `*` (a family of files, as in `test_domain_*`) is left out."""
    texts = [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))] + [(ROOT / "README.md").read_text()]
    cited = set()
    for text in texts:
        cited |= {m.group(0) for m in re.finditer(r"\btest_\w+(?:\.py(?:::\w+)?)?(?!\*)\b", text)
                  if not text[m.end():].startswith("*")}
    return cited


def _defined_tests() -> dict[str, set[str]]:
    """The test functions and classes each file of tests/ defines, by file name."""
    return {p.name: set(re.findall(r"^\s*(?:async )?(?:def|class) (test_\w+|Test\w+)", p.read_text(), re.M))
            for p in (ROOT / "tests").glob("*.py")}


def test_every_test_name_the_docs_cite_exists() -> None:
    """A doc that backs a claim with a test name must name a test that is there: a file of tests/,
    a test in the file it is cited with (`file.py::name`), or, cited alone, a test in some file.
    A renamed or deleted test would otherwise leave the claim with nothing behind it."""
    defined = _defined_tests()
    everywhere = set().union(*defined.values())
    missing = []
    for name in sorted(_cited_tests()):
        file, _, test = name.partition("::")
        if test:
            ok = test in defined.get(file, set())
        elif file.endswith(".py"):
            ok = file in defined
        else:
            ok = f"{file}.py" in defined or file in everywhere
        if not ok:
            missing.append(name)
    assert not missing, missing
    assert len(_cited_tests()) > 100


def test_the_stats_of_ops_md_count_health_watch_streams_as_the_server_does(live_server: LiveServer) -> None:
    """docs/ops.md says which calls `GetServerStats` records. It still left health's `Watch` streams
    out, as they were while they ran non-blocking, outside the interceptors; blocking again, they go
    through every layer, and a real server records one once it ends."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    text = _doc_text("ops.md")
    sentence = text.split("`GetServerStats` (`weightavg stats`, `Client.stats()`) reports, per full method name", 1)[1]
    sentence = sentence.split(": finished calls", 1)[0]
    assert "health and reflection included" in sentence and "but for" not in sentence, sentence
    watch = "/grpc.health.v1.Health/Watch"
    with Client(live_server.address, timeout=60) as c, grpc.insecure_channel(live_server.address) as channel:
        before = c.stats()["methods"].get(watch, {}).get("count", 0)
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()
        for _ in range(600):  # the server records the call once its end reaches it: wait for that, no timing
            if c.stats()["methods"].get(watch, {}).get("count", 0) > before:
                break
            c.ping()
        assert c.stats()["methods"][watch]["count"] == before + 1
