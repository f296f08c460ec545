"""The mistakes a new user made in the first hour, through a real server: for each, the exact text
they now see, and every live handle unchanged (`unchanged`) where the call is refused.

free() without a session is in test_sessions.py, the command line's errors in test_cli.py, the
set-up in test_bootstrap.py and the demo in test_demo.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from weightavg import Client, InvalidArgumentError, NotFoundError

from conftest import LiveServer

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (60, 16)).astype(np.uint8)
LABELS = RNG.integers(0, 4, 60)


def linear(c: Client) -> Any:
    return c.module(["linear", 2, 1])


def classifier(c: Client) -> Any:
    q = c.module(["sequential", ["linear", "a", 16, 4]])
    return c.model(q, c.loss("ce"), c.opt("sgd", q, 0.1))


# -- data at upload --------------------------------------------------------------------------------


def test_float64_and_uint8_images_with_any_integer_labels_are_converted_and_train(client: Client) -> None:
    m = classifier(client)
    for x, y in [(IMAGES / 255, LABELS), (IMAGES, LABELS.astype(np.uint8)), (IMAGES / 255, LABELS.astype(np.int32))]:
        assert client.train(m, x, y) == 2  # 60 samples, batches of 32
        assert isinstance(client.run(m), float)
    client.test(m, IMAGES / 255, LABELS.astype(np.int16))
    client.test(m, metrics="accuracy")
    assert 0.0 <= client.testrun(m) <= 100.0
    assert client.evaluate(m, IMAGES[:3] / 255).dtype == np.float32


def test_float_labels_are_refused_at_upload_naming_y(client: Client, unchanged: Any) -> None:
    m = classifier(client)
    client.train(m, IMAGES, LABELS)
    with unchanged(), pytest.raises(InvalidArgumentError) as err:
        client.train(m, IMAGES, LABELS.astype(np.float64))
    assert str(err.value) == (
        "INVALID_ARGUMENT: y (targets) is float64 of shape [60]; the ce loss takes integer class indices (any "
        "integer dtype, widened to int64) or class probabilities (floating, one column per class): send integer "
        "labels; nothing loaded"
    )
    with unchanged(), pytest.raises(InvalidArgumentError) as err:
        client.run(m, IMAGES.astype(np.complex64), LABELS)
    assert str(err.value) == (
        "INVALID_ARGUMENT: x (inputs) is complex64; the model's parameters are float32: send real float32 values "
        "(integers and other float widths are converted); nothing loaded"
    )
    client.run(m)  # the data loaded before is still there


# -- unknown names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "call", "message"),
    [
        (None, lambda c, _: c.module(["sequential", ["batchnorm", "b", 16]]),
         "unrecognized module type: 'batchnorm'; did you mean 'batchnorm1d', 'batchnorm2d' or 'batchnorm3d'? "
         "(every type: weightavg info ADDRESS, or GetServerInfo's layer_types)"),
        (None, lambda c, _: c.module(["linear", 4, 2, {"bais": False}]),
         "linear: unknown option 'bais'; did you mean 'bias'? (options: in, out, bias)"),
        (None, lambda c, _: c.loss("cross_entropy"), "unrecognized loss: 'cross_entropy' (one of ce, nll, mse, bce, "
         "bcelogits, smoothl1)"),
        (linear, lambda c, q: c.opt("sdg", q),
         "unrecognized optimizer: 'sdg'; did you mean 'sgd'? (one of sgd, adam, adamw, rmsprop, adagrad, fedadam, fedyogi, fedadagrad)"),
        (linear, lambda c, q: c.opt("sgd", q, moment=0.9),
         "sgd: unknown option 'moment'; did you mean 'momentum'? (options: lr, momentum, dampening, decay, "
         "nesterov)"),
        (classifier, lambda c, m: c.train(m, metrics="acuracy"),
         "metrics: unrecognized metric 'acuracy'; did you mean 'accuracy'? (one of loss, batchloss, accuracy, "
         "matches, predict, output)"),
        (classifier, lambda c, m: c.train(m, batch_size=10),
         "unrecognized train setting: batch_size; did you mean 'batchsize'? (settings: batchsize, droplast, "
         "shuffle, seed, metrics); nothing set"),
    ],
    ids=["layer-type", "layer-option", "loss", "optimizer", "optimizer-option", "metric", "setting"],
)
def test_unknown_names_suggest_the_closest_valid_ones(
    client: Client, unchanged: Any, setup: Any, call: Any, message: str
) -> None:
    made = setup(client) if setup else None
    with unchanged(), pytest.raises(InvalidArgumentError) as err:
        call(client, made)
    assert err.value.message == message


NET = ["sequential", ["linear", "a", 4, 3], ["batchnorm1d", "b", 3]]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c, q, d: c.parm(q, "a.weigth"), "parameter 'a.weigth' not found; did you mean 'a.weight' or 'b.weight'?"),
        (lambda c, q, d: c.parm(q, "b.running_mean"),
         "parameter 'b.running_mean' not found: it is a buffer; read buffers through a view, "
         "dict(buffers(m), 'b.running_mean') (ViewBuffers), or a copy, copyparms(m, buffers=True) (CopyParameters "
         "with buffers)"),
        (lambda c, q, d: c.parmnames(q, "bb"), "module has no child 'bb'; did you mean 'b'?"),
        (lambda c, q, d: c.dict(d, "a.wieght"), "dictionary has no entry 'a.wieght'; did you mean 'a.weight' or 'b.weight'?"),
        (lambda c, q, d: c.delete(d, "a.bais"),
         "dictionary has no entry 'a.bais'; nothing deleted; did you mean 'a.bias' or 'b.bias'?"),
        (lambda c, q, d: c.parm(q, "zzz"), "parameter 'zzz' not found"),  # nothing close: nothing suggested
    ],
    ids=["parameter", "buffer", "child", "entry", "delete", "nothing-close"],
)
def test_tensor_and_child_names_not_found_suggest_the_closest_ones(
    client: Client, unchanged: Any, call: Any, message: str
) -> None:
    """A misspelt parameter, entry or child name was answered NOT_FOUND naming it alone, and a buffer
    asked for as a parameter (torch.fetch's docstring promised buffers) with no word of where
    buffers are read; layer, loss and option names already suggested the closest valid ones."""
    q = client.module(NET)
    d = client.copyparms(q)
    with unchanged(), pytest.raises(NotFoundError) as err:
        call(client, q, d)
    assert err.value.message == message


def test_a_required_merge_option_left_out_says_it_is_required(client: Client, unchanged: Any) -> None:
    """"ties: option 'density' not defined" read as if ties had no option density."""
    base = client.dict({"w": np.zeros(4, np.float32)})
    tuned = [client.dict({"w": np.full(4, v, np.float32)}) for v in (1.0, -2.0)]
    with unchanged(), pytest.raises(InvalidArgumentError) as err:
        client.merge("ties", tuned, base=base)
    assert err.value.message == ("ties: option 'density' is required and was not given; give density=, or one "
                                 "density per dictionary (densities=)")
    with unchanged():  # the second way it names works
        client.free(client.merge("ties", tuned, base=base, densities=[0.5, 1.0]))
    with unchanged(), pytest.raises(InvalidArgumentError) as err:
        client.merge("slerp", tuned)
    assert err.value.message == "slerp: option 't' is required and was not given"


@pytest.mark.parametrize(
    ("call", "hint"),
    [
        (lambda c, q, d: c.train(q, IMAGES[:, :4].astype(np.float32), LABELS),
         "; make a model of the module first: model(m, loss('ce'), opt('sgd', m, lr)) (CreateModel)"),
        (lambda c, q, d: c.lr(q, 0.1),
         "; make an optimizer over the module first: opt('sgd', m, lr) (or a model: model(m, loss, optimizer)) "
         "(CreateOptimizer; CreateModel)"),
        (lambda c, q, d: c.avgparms(d, q),  # the arguments swapped
         "; copyparms(m) (CopyParameters) copies a module's parameters into a dictionary (averages take the module "
         "first and the dictionary second: avgparms(m, d), ema(m, e); on the wire, the module in handle and the "
         "dictionary in dictionary)"),
        (lambda c, q, d: c.ema(q, q), "; copyparms(m) (CopyParameters) copies a module's parameters into a dictionary"),
    ],
    ids=["train-a-module", "lr-of-a-module", "avgparms-swapped", "ema-into-a-module"],
)
def test_a_handle_of_the_wrong_kind_says_how_to_make_the_right_one(
    client: Client, unchanged: Any, call: Any, hint: str
) -> None:
    """"expecting model handle, given module handle" named both kinds and not the way from one to
    the other, which a user who has only made modules and dictionaries does not know yet."""
    q = client.module(["linear", "a", 4, 2])
    d = client.copyparms(q)
    with unchanged(), pytest.raises(InvalidArgumentError) as err:
        call(client, q, d)
    assert err.value.message.startswith("expecting ") and hint in err.value.message


def test_fetching_a_whole_module_says_how_to(client: Client, unchanged: Any) -> None:
    """dict(m) on a module, a user's first try at its weights, was refused "name the parameters to
    fetch from a module", with no word of the view or copy that fetch them all."""
    q = client.module(NET)
    with unchanged(), pytest.raises(InvalidArgumentError) as err:
        client.dict(q)
    assert err.value.message == (
        "name the parameters to fetch from a module, or fetch them all through a view: dict(parms(m)) (and its "
        "buffers: dict(buffers(m))), or a copy: copyparms(m, buffers=True); on the wire: set FetchTensorsRequest.names, "
        "or fetch the dictionary that ViewParameters, ViewBuffers or CopyParameters (with buffers) returns"
    )
    assert list(client.dict(client.parms(q))) == client.parmnames(q)


def test_client_side_names_suggest_too(client: Client) -> None:
    m = classifier(client)
    with pytest.raises(KeyError) as key:
        client.train(m, "batchsise")
    assert key.value.args[0] == (
        "unrecognized option 'batchsise'; did you mean 'batchsize'? (one of batchsize, droplast, shuffle, seed, metrics)"
    )
    with pytest.raises(ValueError) as value:
        client.to(m, dtype="float")
    assert str(value.value).startswith("unknown dtype 'float'; did you mean 'float16', 'float32' or 'float64'? (one of ")


def test_a_size_written_as_a_string_is_refused_with_the_reason(client: Client) -> None:
    before = client.handles()
    with pytest.raises(ValueError) as err:
        client.module(["linear", "2", 1])
    assert str(err.value) == (
        "layer spec ['linear', '2', 1]: '2' is a string, so it would name the layer; sizes and other options are "
        "numbers: write ['linear', 2, 1] (to name the layer, use a name that is not a number: ['linear', 'a', 2, 1])"
    )
    with pytest.raises(ValueError, match=r"^layer spec \['linear', '784', 800\]: '784' is a string"):
        client.module(["sequential", ["linear", "784", 800]])
    assert client.handles() == before


# -- shape errors: one wording in every verb -------------------------------------------------------------


def test_shape_errors_give_both_shapes_and_the_parameter_in_every_verb(client: Client, unchanged: Any) -> None:
    m = client.module(["linear", 4, 2])
    p = client.copyparms(m)
    view = client.parms(m)
    client.dict(p, "weight", np.ones((2, 3), np.float32))
    torch_says = "The size of tensor a (4) must match the size of tensor b (3) at non-singleton dimension 1"
    with unchanged():
        for call, value in [(lambda: client.copyparms(m, p), "the dictionary's 'weight'"),
                            (lambda: client.avgparms(m, p), "the dictionary's 'weight'"),
                            (lambda: client.parm(m, "weight", np.ones((2, 3), np.float32)), "the value sent")]:
            with pytest.raises(InvalidArgumentError) as err:
                call()
            assert err.value.message == (
                f"{torch_says} (a: parameter 'weight', shape [2, 4]; b: {value}, shape [2, 3]); nothing changed"
            )
        with pytest.raises(InvalidArgumentError) as err:
            client.dict(view, "weight", np.ones((2, 3), np.float32))
        assert err.value.message == (
            f"{torch_says} (a: the module's 'weight', shape [2, 4]; b: the value for 'weight', shape [2, 3]); "
            "nothing changed"
        )


# -- what the client prints and connects to -------------------------------------------------------------


def test_counts_and_metrics_are_plain_python_values(client: Client) -> None:
    m = client.module(["linear", 2, 1])
    p = client.copyparms(m)
    client.parm(m, "weight", 10)
    assert client.avgparms(m, p) == 2
    n = client.dict(p)[".n"]
    assert type(n) is float and repr(n) == "2.0"
    assert type(client.dict(p, ".n")) is float
    assert client.dict(p, "bias").dtype == np.float32  # arrays keep their dtype


def test_an_address_without_a_port_gets_the_server_s_default_never_443(live_server: LiveServer) -> None:
    with Client("127.0.0.1") as c:
        assert c.address == "127.0.0.1:50051"
    with Client("[::1]") as c:
        assert c.address == "[::1]:50051"
    with pytest.raises(ValueError) as err:
        Client("localhost:grpc")
    assert str(err.value) == "address 'localhost:grpc': the port must be a number from 1 to 65535, e.g. 'localhost:50051'"
    with Client(live_server.address) as c:
        c.ping()


@pytest.mark.parametrize(("scheme", "tls"), [("http", ""), ("grpc", ""), ("HTTPS", " (TLS is chosen with tls=True or tls_ca=..., not by the scheme)")])
def test_an_address_written_as_a_url_is_refused_with_the_host_and_port(live_server: LiveServer, scheme: str, tls: str) -> None:
    """Client("http://host:port") went to gRPC as a host name to look up: UNAVAILABLE "Misformatted
    domain name ... is the server running?", as if the server were down."""
    with pytest.raises(ValueError) as err:
        Client(f"{scheme}://{live_server.address}/")
    assert str(err.value) == (
        f"address '{scheme}://{live_server.address}/': a gRPC address has no {scheme}:// scheme; give host:port, "
        f"e.g. '{live_server.address}'{tls}"
    )
    with Client(f"dns:///{live_server.address}") as c:  # gRPC's own URI schemes pass through
        c.ping()
