"""weightavg.mergekit's reading of mergekit configs, in process and without a server: which call each
config becomes, the patterns its filters turn into, and the configs it refuses. tests/test_mergekit.py
runs the calls on a server against mergekit itself."""

from __future__ import annotations

from typing import Any

import fnmatch

import pytest

from weightavg import mergekit

NAMES = ["model.embed_tokens.weight",
         *[f"model.layers.{i}.{k}" for i in range(3) for k in ("self_attn.q_proj.weight", "mlp.up_proj.weight",
                                                               "input_layernorm.weight")],
         "model.norm.weight", "lm_head.weight"]
MODELS = {"base": "h-base", "a": "h-a", "b": "h-b"}


def ties(**parameters: Any) -> dict[str, Any]:
    return {"merge_method": "ties", "base_model": "base", "parameters": parameters,
            "models": [{"model": "base"},
                       {"model": "a", "parameters": {"weight": 1.0, "density": [{"filter": "mlp", "value": 0.3},
                                                                              {"value": [0.9, 0.5]}]}},
                       {"model": "b", "parameters": {"weight": [0.0, 1.0], "density": 0.5}}]}


def test_a_ties_config_becomes_one_call_with_a_filters_pattern() -> None:
    call = mergekit.call(ties(), MODELS, NAMES)
    assert (call.method, call.dicts, call.base) == ("ties", ["h-a", "h-b"], "h-base")
    assert call.weights == [1.0, (0.0, 1.0)]
    assert call.densities == [(0.9, 0.5), 0.5]
    assert call.options == {"rescale_norm": "l1", "lam": 1.0, "normalize": True, "rescale": False}  # ties' defaults
    assert call.per_tensor == {"*mlp*": {"lam": 1.0, "normalize": True, "rescale": False,
                                         "weights": [1.0, (0.0, 1.0)], "densities": [0.3, 0.5]}}


def test_shared_parameters_override_mergekits_defaults_and_extra_options_pass_through() -> None:
    call = mergekit.call(ties(normalize=False, rescale=True, **{"lambda": 0.7, "int8_mask": True}), MODELS, NAMES)
    assert call.options == {"rescale_norm": "l1", "lam": 0.7, "normalize": False, "rescale": True}
    config = {**ties(), "merge_method": "dare_ties"}
    dare = mergekit.call(config, MODELS, NAMES, seed=3)
    assert dare.method == "dare"
    assert dare.options == {"consensus": True, "rescale_norm": "l1", "lam": 1.0, "normalize": False, "rescale": True,
                            "seed": 3}


def test_a_global_weight_stands_for_models_that_give_none() -> None:
    config = {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"weight": 0.4},
              "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 2.0}}]}
    call = mergekit.call(config, MODELS, NAMES)
    assert call.weights == [0.4, 2.0] and call.densities is None and call.per_tensor == {}


def test_slerp_runs_from_the_base_to_the_other_model() -> None:
    config = {"merge_method": "slerp", "base_model": "b", "models": [{"model": "a"}, {"model": "b"}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}}
    call = mergekit.call(config, MODELS, NAMES)
    assert (call.method, call.dicts, call.base, call.weights) == ("slerp", ["h-b", "h-a"], None, None)
    assert call.options == {"t": 0.5} and call.per_tensor == {"*self_attn*": {"t": (0.0, 1.0)}}


def test_filters_that_overlap_become_the_entries_own_names() -> None:
    """A name with both filters takes the first matching condition; "*mlp*" would also take
    'a.mlp.attn', so the MLP group's pattern is its own name. The largest group is the call's."""
    names = ["a.mlp.x", "a.mlp.attn", "b.attn.y", "c.z", "d.q", "e.r"]
    config = {"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "attn", "value": 2.0}, {"filter": "mlp", "value": 3.0},
                                                 {"value": 1.0}]}},
        {"model": "b", "parameters": {"weight": 1.0}}]}
    call = mergekit.call(config, MODELS, names)
    assert call.weights == [1.0, 1.0]
    assert call.per_tensor == {"a.mlp.x": {"normalize": True, "weights": [3.0, 1.0]},
                               "*attn*": {"normalize": True, "weights": [2.0, 1.0]}}


def test_fnmatch_specials_in_filters_and_names_match_only_themselves() -> None:
    names = ["h[1].w", "h1.w", "x*y", "z"]
    config = {"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "h[1]", "value": 2.0}, {"filter": "*", "value": 1.0}]}},
        {"model": "b", "parameters": {"weight": [{"filter": "x*", "value": 4.0}, {"value": 1.0}]}}]}
    call = mergekit.call(config, MODELS, names)
    assert call.weights == [1.0, 1.0]
    assert call.per_tensor == {"*h[[]1]*": {"normalize": True, "weights": [2.0, 1.0]},
                               "*x[*]*": {"normalize": True, "weights": [1.0, 4.0]}}
    assert [n for n in names if fnmatch.fnmatchcase(n, "*h[[]1]*")] == ["h[1].w"]


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "a method the server lacks": ({**ties(), "merge_method": "frankenmerge"}, "'frankenmerge' is not one the server has"),
    "passthrough of two models": ({**ties(), "merge_method": "passthrough", "base_model": None},
                                  r"passthrough takes one model \(a base_model counts as one\), given 3"),
    "slices beside models": ({**ties(), "slices": []}, "give 'models' or 'slices', not both"),
    "an unknown key": ({**ties(), "modules": {}}, "key 'modules' is not supported"),
    "a parameter of another method": (ties(gamma=0.01), "parameter 'gamma' in parameters is not one ties takes"),
    "gammas that differ between models": (
        {**ties(), "merge_method": "breadcrumbs", "models": [{"model": "a", "parameters": {"weight": 1, "gamma": 0.1}},
                                                             {"model": "b", "parameters": {"weight": 1}}]},
        r"'gamma' differs between the models at entry 'model.embed_tokens.weight' \(\['0.01', '0.1'\]\)"),
    "a model without a handle": ({**ties(), "models": [{"model": "c", "parameters": {"weight": 1}}]},
                                 "model 'c' of the config has no handle"),
    "linear without a weight": ({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]},
                                "'weight' is required for linear"),
    "slerp of three": ({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5},
                        "models": [{"model": "a"}, {"model": "b"}, {"model": "base"}]}, "one other model, given 2"),
    "a setting of the wrong kind": (ties(normalize="yes"), "'normalize': 'yes' is not a number"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_the_server_cannot_do_as_mergekit_does_is_refused(case: str) -> None:
    config, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        mergekit.call(config, MODELS, NAMES)


def test_multislerp_takes_every_model_without_a_base_and_the_offsets_with_one() -> None:
    models = [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": [0.5, 1.0]}}]
    alone = mergekit.call({"merge_method": "multislerp", "models": models}, MODELS, NAMES)
    assert (alone.method, alone.dicts, alone.base, alone.weights) == ("multislerp", ["h-a", "h-b"], None,
                                                                      [1.0, (0.5, 1.0)])
    assert alone.options == {"normalize": True}
    based = mergekit.call({"merge_method": "multislerp", "base_model": "base", "models": models,
                           "parameters": {"normalize_weights": False}}, MODELS, NAMES)
    assert (based.dicts, based.base, based.options) == (["h-a", "h-b"], "h-base", {"normalize": False})


def sliced(*ranges: list[int], **parameters: Any) -> dict[str, Any]:
    return {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5},
            "slices": [{"sources": [{"model": m, "layer_range": r, "parameters": {"weight": 1.0}}
                                    for m, r in zip(("a", "b"), ranges)], "parameters": parameters}]}


def test_one_slice_over_every_layer_is_the_models_form_with_the_slices_parameters_first() -> None:
    """The slice's density applies where its filter matches; elsewhere the config's, as in mergekit."""
    call = mergekit.call(sliced([0, 3], [0, 3], density=[{"filter": "mlp", "value": 0.2}]), MODELS, NAMES)
    assert (call.method, call.dicts, call.base) == ("ties", ["h-a", "h-b"], "h-base")
    assert call.densities == [0.5, 0.5]
    assert call.per_tensor == {"*mlp*": {"lam": 1.0, "normalize": True, "rescale": False, "weights": [1.0, 1.0],
                                         "densities": [0.2, 0.2]}}


@pytest.mark.parametrize(("config", "message"), [
    (sliced([0, 2], [0, 3]), r"source 'a' spans layers \[0, 2\]; only one slice over every layer \(\[0, 3\]\)"),
    ({**sliced([0, 3], [0, 3]), "slices": [{"sources": []}, {"sources": []}]}, "only one slice over every layer"),
    ({**sliced([0, 3], [0, 3]), "models": [{"model": "a"}]}, "give 'models' or 'slices', not both"),
])
def test_slices_that_cut_or_stack_layers_are_refused(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mergekit.call(config, MODELS, NAMES)


def test_numbers_yaml_leaves_as_text_are_numbers_as_in_mergekit() -> None:
    """YAML 1.1 reads `1e-3` as a string; mergekit takes it as a number, and so does the reader."""
    config = ties(**{"lambda": "1e-3"})
    config["models"][2]["parameters"]["weight"] = ["0", "5e-1"]
    call = mergekit.call(config, MODELS, NAMES)
    assert call.options["lam"] == 0.001 and call.weights == [1.0, (0.0, 0.5)]


def test_della_takes_mergekits_defaults_and_one_epsilon() -> None:
    config = {**ties(), "merge_method": "della"}
    call = mergekit.call(config, MODELS, NAMES, seed=4)
    assert call.method == "della"
    assert call.options == {"consensus": True, "rescale_norm": "l1", "lam": 1.0, "normalize": True, "rescale": True,
                            "epsilon": 0.15, "seed": 4}
    linear = mergekit.call({**config, "merge_method": "della_linear", "parameters": {"epsilon": 0.05}}, MODELS, NAMES)
    assert (linear.options["consensus"], linear.options["normalize"], linear.options["epsilon"]) == (False, False, 0.05)


def test_nuslerp_is_slerp_at_threshold_1_with_t_from_the_weights() -> None:
    models = [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 3.0}}]
    call = mergekit.call({"merge_method": "nuslerp", "base_model": "base", "models": models}, MODELS, NAMES)
    assert (call.method, call.dicts, call.base, call.weights) == ("slerp", ["h-a", "h-b"], "h-base", None)
    assert call.options == {"threshold": 1.0, "t": 0.75, "vectors": "tensor"}
    for parameters, vectors in (({"nuslerp_flatten": False}, "rows"),
                                ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, "columns"),
                                ({"nuslerp_row_wise": True}, "tensor")):  # row_wise counts only unflattened
        rows = mergekit.call({"merge_method": "nuslerp", "models": models, "parameters": parameters}, MODELS, NAMES)
        assert rows.options["vectors"] == vectors, parameters
    even = mergekit.call({"merge_method": "nuslerp", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                                                {"model": "b", "parameters": {"weight": -1.0}}]},
                         MODELS, NAMES)
    assert even.base is None and even.options["t"] == 0.5  # weights summing to 0: halfway, as mergekit
    graded = mergekit.call({"merge_method": "nuslerp", "models": [models[0], {"model": "b", "parameters": {
        "weight": [0.0, 2.0]}}]}, MODELS, NAMES)  # each tensor's t from the weights at its layer (3 layers)
    assert graded.options["t"] == 0.0  # the embeddings, the final norm and the head, at the first value
    assert graded.per_tensor == {f"model.layers.{i}.{k}": {"t": t, "vectors": "tensor"} for i, t in ((1, 0.5), (2, 2.0 / 3.0))
                                 for k in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")}
    for config, message in (
        ({"merge_method": "nuslerp", "models": models, "parameters": {"nuslerp_flatten": 0.5}}, "are true or false"),
        ({"merge_method": "nuslerp", "models": [*models, {"model": "base"}]}, "takes two models"),
    ):
        with pytest.raises(ValueError, match=message):
            mergekit.call(config, MODELS, NAMES)
