"""weightavg.vocabulary in process, with numpy alone: the output vocabulary a config's tokenizer gives,
each model's rows moved to it, the default rows of tokens a model lacks, and the tokenizer files
written. tests/test_mergekit.py compares whole merges with mergekit's own."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightavg import vocabulary


def model_dir(root: Path, name: str, plain: list[str], added: list[str], rows: int | None = None,
              unigram: bool = False) -> Path:
    """A model directory with a tokenizer.json (plain tokens, then added special tokens) and a
    config.json whose vocab_size is `rows` (the tokens' count by default)."""
    directory = root / name
    directory.mkdir()
    vocab: Any = [[t, 0.0] for t in plain] if unigram else {t: i for i, t in enumerate(plain)}
    entries = [{"id": len(plain) + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for k, t in enumerate(added)]
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram" if unigram else "BPE",
                                                                    "vocab": vocab}, "added_tokens": entries}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in entries}}))
    (directory / "config.json").write_text(json.dumps({"vocab_size": rows or len(plain) + len(added)}))
    return directory


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {"base": model_dir(tmp_path, "base", ["a", "b", "c"], ["<s>"]),
            "x": model_dir(tmp_path, "x", ["a", "b", "c", "d"], ["<s>", "<t>"]),
            "y": model_dir(tmp_path, "y", ["b", "a", "c"], ["<t>", "<s>"], unigram=True)}


def union_of(models: dict[str, Path], **tokenizer: Any) -> vocabulary.Plan:
    config = {"base_model": "base", "tokenizer": {"source": "union", **tokenizer}}
    made = vocabulary.plan(config, models, ["x", "y", "base"])
    assert made is not None
    return made


def test_a_union_is_the_bases_tokens_then_the_others_plain_then_added(models: dict[str, Path]) -> None:
    plan = union_of(models)
    assert plan.tokens == ("a", "b", "c", "<s>", "d", "<t>")
    assert plan.positions["y"].tolist() == [1, 0, 2, 4, -1, 3]  # y's rows of each output token
    assert [e["content"] for e in plan.appended] == ["d", "<t>"]
    assert plan.appended[0]["normalized"] and not plan.appended[0]["special"]  # a plain token, as add_tokens makes it
    assert plan.appended[1]["special"] and plan.appended[1]["id"] == 5


def test_rows_move_to_the_output_and_lacking_tokens_take_mergekits_defaults(models: dict[str, Path]) -> None:
    """"d" is x's alone (its row everywhere), "<t>" x's and y's but not the base's (their mean); the
    base's own rows stay where the base has them."""
    plan = union_of(models)
    arrays = {name: np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + 100 * k
              for k, (name, rows) in enumerate((("x", 6), ("y", 5), ("base", 4)))}
    peers = {name: {"embed": array} for name, array in arrays.items()}
    aligned = {name: plan.aligned(name, peers, ["embed"])["embed"] for name in peers}
    d, t = arrays["x"][3], (arrays["x"][5] + arrays["y"][3]) / 2
    np.testing.assert_array_equal(aligned["y"], np.stack([arrays["y"][1], arrays["y"][0], arrays["y"][2],
                                                          arrays["y"][4], d, arrays["y"][3]]))
    np.testing.assert_array_equal(aligned["base"], np.stack([*arrays["base"], d, t]))
    np.testing.assert_array_equal(aligned["x"], arrays["x"][[0, 1, 2, 4, 3, 5]])  # its "<s>" and "d" swap
    assert plan.aligned("x", peers, ["embed"]).unmade("embed").shape == (6, 2)


def test_padding_rows_are_each_models_mean_and_half_types_meet_in_float32(models: dict[str, Path]) -> None:
    plan = union_of(models, pad_to_multiple_of=4)
    assert plan.rows == 8
    peers = {"x": {"e": np.ones((6, 3), ml_dtypes.bfloat16)}, "y": {"e": np.full((5, 3), 3, np.float16)},
             "base": {"e": np.zeros((4, 3), ml_dtypes.bfloat16)}}
    base = plan.aligned("base", peers, ["e"])["e"]
    assert base.dtype == np.float32 and base.shape == (8, 3)
    np.testing.assert_array_equal(base[6:], np.full((2, 3), base[:6].mean(axis=0)))
    np.testing.assert_array_equal(base[5], [2, 2, 2])  # "<t>": the mean of x's 1 and y's 3


def test_config_tokens_give_sources_and_force_them(models: dict[str, Path]) -> None:
    config = {"base_model": "base", "tokenizer": {"source": "base", "tokens": {
        "<s>": {"source": {"kind": "model_token", "model": "y", "token": "a"}, "force": True},
        "<new>": {"source": {"kind": "zero"}}, "c": {"source": "x", "force": True}}}}
    plan = vocabulary.plan(config, models, ["x", "y", "base"])
    assert plan is not None and plan.tokens == ("a", "b", "c", "<s>", "<new>")
    peers = {name: {"e": np.full((rows, 1), k + 1, np.float32) * np.arange(1, rows + 1)[:, None]}
             for k, (name, rows) in enumerate((("x", 6), ("y", 5), ("base", 4)))}
    base = plan.aligned("base", peers, ["e"])["e"][:, 0]
    assert base.tolist() == [3.0, 6.0, 3.0, 2.0 * 2, 0.0]  # a, b its own; c x's row 2; <s> y's "a" (row 1); zeros


def test_a_model_without_a_tokenizer_takes_the_bases_vocabulary(models: dict[str, Path]) -> None:
    (models["y"] / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match="'y' has no tokenizer.json: taken to have 'base''s vocabulary"):
        plan = union_of(models)
    assert plan.positions["y"].tolist()[:4] == [0, 1, 2, 3]


def test_the_written_tokenizer_gains_the_appended_tokens(models: dict[str, Path], tmp_path: Path) -> None:
    plan = union_of(models)
    out = tmp_path / "out"
    out.mkdir()
    plan.write(out)
    written = json.loads((out / "tokenizer.json").read_text())
    assert [(e["id"], e["content"]) for e in written["added_tokens"]] == [(3, "<s>"), (4, "d"), (5, "<t>")]
    assert sorted(json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]) == ["3", "4", "5"]
    assert json.loads((models["base"] / "tokenizer.json").read_text())["added_tokens"][-1]["content"] == "<s>"


@pytest.mark.parametrize(("tokenizer", "message"), [
    ("base", "mergekit key 'tokenizer' is 'base'; give a mapping"),
    ({"source": "union", "tokens": {"<x>": {"source": "x", "weight": 1}}}, "give its 'source' and optionally 'force'"),
    ({"source": "union", "tokens": {"<x>": {"source": {"kind": "model_token", "model": "x"}}}}, "one of token or "
     "token_id"),
    ({"source": "union", "tokens": {"<x>": {"source": "x", "force": "yes"}}}, "force is 'yes'"),
    ({"source": 3}, "tokenizer source 3: give 'base'"),
])
def test_what_cannot_be_read_is_refused_naming_the_fix(models: dict[str, Path], tokenizer: Any, message: str) -> None:
    with pytest.raises(vocabulary.VocabularyError, match=message):
        vocabulary.plan({"base_model": "base", "tokenizer": tokenizer}, models, ["x", "y", "base"])


def test_tokens_beyond_a_models_rows_are_refused(tmp_path: Path) -> None:
    models = {"base": model_dir(tmp_path, "base", ["a", "b"], ["<s>"]),
              "x": model_dir(tmp_path, "x", ["a", "b"], ["<s>", "<t>"], rows=3)}
    with pytest.raises(vocabulary.VocabularyError, match="model 'x''s token '<t>' has id 3, beyond its 3 embedding"):
        vocabulary.plan({"base_model": "base", "tokenizer_source": "x"}, models, ["x", "base"])
    with pytest.raises(vocabulary.VocabularyError, match="'x''s tokenizer has 1 token.* at ids 3 and up"):
        vocabulary.plan({"base_model": "x", "tokenizer_source": "base"}, models, ["base", "x"])


def test_a_multimodal_config_gives_its_rows_in_text_config(tmp_path: Path) -> None:
    """Llava-like configs nest the language model's vocab_size in text_config."""
    models = {"base": model_dir(tmp_path, "base", ["a", "b"], ["<s>"]),
              "x": model_dir(tmp_path, "x", ["a", "b"], ["<s>", "<image>"])}
    (models["x"] / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 4}, "image_token_index": 3}))
    plan = vocabulary.plan({"base_model": "base", "tokenizer_source": "union"}, models, ["x", "base"])
    assert plan is not None and plan.tokenizers["x"].rows == 4 and plan.tokens[-1] == "<image>"
    held = {"text_config": {"vocab_size": 4}}
    holder = vocabulary.vocab_size_holder(held)
    assert holder is held["text_config"]
    (models["x"] / "config.json").write_text(json.dumps({"text_config": {}}))
    with pytest.raises(vocabulary.VocabularyError, match="gives no vocab_size \\(nor text_config's\\)"):
        vocabulary.plan({"base_model": "base", "tokenizer_source": "union"}, models, ["x", "base"])


POOL, ADDED = [f"p{i}" for i in range(10)], [f"<a{i}>" for i in range(4)]


@st.composite
def vocabularies(draw: st.DrawFn) -> tuple[dict[str, tuple[list[str], list[str], int]], str, int | None]:
    """Three models' vocabularies drawn from one pool (plain tokens in any order, then added ones),
    each with 0-2 embedding rows beyond its tokens; a tokenizer source and a padding multiple."""
    made = {}
    for name in ("base", "x", "y"):
        plain = draw(st.lists(st.sampled_from(POOL), min_size=1, unique=True))
        added = draw(st.lists(st.sampled_from(ADDED), unique=True))
        made[name] = (plain, added, len(plain) + len(added) + draw(st.integers(0, 2)))
    return made, draw(st.sampled_from(["base", "union", "x"])), draw(st.sampled_from([None, 4]))


@settings(max_examples=60)
@given(vocabularies())
def test_every_model_row_lands_on_its_token_and_lacking_tokens_take_mergekits_rule(
    drawn: tuple[dict[str, tuple[list[str], list[str], int]], str, int | None]
) -> None:
    """Whatever the vocabularies: each model's row of a token it has lands on the token's output id,
    a token it lacks takes the only model's row, else the base's, else the mean of those that have
    it, and the padding rows are the mean of the others (mergekit's rules, stated here)."""
    made, source, multiple = drawn
    value = {token: float(i + 1) for i, token in enumerate(POOL + ADDED)}
    with tempfile.TemporaryDirectory() as root:
        models = {name: model_dir(Path(root), name, plain, added, rows) for name, (plain, added, rows) in made.items()}
        order = ["x", "y", "base"]
        settings_ = {"source": source, **({"pad_to_multiple_of": multiple} if multiple else {})}
        plan = vocabulary.plan({"base_model": "base", "tokenizer": settings_}, models, order)
        assert plan is not None
        ids = {name: {t: i for i, t in enumerate(plain + added)} for name, (plain, added, _) in made.items()}
        arrays = {}
        for k, name in enumerate(order):
            rows = np.zeros((made[name][2], 2), np.float32)
            for token, i in ids[name].items():
                rows[i] = [value[token], 1000.0 * (k + 1)]
            arrays[name] = {"e": rows}
        for k, name in enumerate(order):
            got = plan.aligned(name, arrays, ["e"])["e"]
            assert got.shape == (plan.rows, 2)
            for out, token in enumerate(plan.tokens):
                having = [p for p in order if token in ids[p]]
                if token in ids[name]:
                    want = arrays[name]["e"][ids[name][token]]
                elif len(having) == 1:
                    want = arrays[having[0]]["e"][ids[having[0]][token]]
                elif "base" in having:
                    want = arrays["base"]["e"][ids["base"][token]]
                else:
                    want = np.mean([arrays[p]["e"][ids[p][token]] for p in having], axis=0)
                np.testing.assert_allclose(got[out], want, rtol=1e-6, err_msg=f"{name} {token}")
            np.testing.assert_allclose(got[len(plan.tokens):], np.broadcast_to(
                got[:len(plan.tokens)].mean(axis=0), (plan.rows - len(plan.tokens), 2)), rtol=1e-6)
            if source == "base":
                assert set(plan.tokens) == set(ids["base"])
            elif source == "union":
                assert set(plan.tokens) == set().union(*ids.values())
