"""domain.soups in process: greedy soups on scikit-learn's bundled digits (real data, no download) and on
hand-made ingredients whose scores are known, the model put back bit for bit every time, and every
refusal made before anything changes.

The greedy-soup oracle is written out here (mlfoundations/model-soups' recipe): rank by held-out
score, start from the best, keep a candidate uniform average only when it strictly improves.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from weightavg_server.domain import footprint, losses, optimizers, soups, training
from weightavg_server.domain.dictionaries import TensorDict
from weightavg_server.domain.errors import Cancelled, FailedPrecondition, InvalidArgument

CPU = torch.device("cpu")


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sklearn = pytest.importorskip("sklearn.datasets")
    x, y = sklearn.load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    return x[:1200], y[:1200], x[1200:], y[1200:]


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def model_of(module: torch.nn.Module, lr: float = 0.1) -> training.Model:
    return training.create_model(module, losses.create_loss("ce"), optimizers.create_optimizer("sgd", module, (lr, 0.9)))


def train(model: training.Model, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    training.set_options(model, "train", [("batchsize", 50), ("shuffle", True), ("seed", seed)])
    training.set_data(model, "train", x, y, CPU)
    for _ in range(epochs):
        training.run_epoch(model)


def parameters(module: torch.nn.Module) -> TensorDict:
    return TensorDict({n: p.detach().clone() for n, p in module.named_parameters()})


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def accuracy(model: training.Model, d: TensorDict) -> float:
    """The oracle's scorer: load into a deep copy, evaluate on the test data in plain PyTorch."""
    twin = copy.deepcopy(model.module)
    twin.load_state_dict({**twin.state_dict(), **d.entries})
    assert model.test_data is not None
    with torch.no_grad():
        twin.eval()
        predicted = twin(model.test_data.x).argmax(-1)
    return 100.0 * float((predicted == model.test_data.y).double().mean())


@pytest.fixture(scope="module")
def fine_tunes() -> tuple[training.Model, list[TensorDict]]:
    """One model trained briefly, then fine-tuned four times from it with different seeds and rates."""
    x, y, xt, yt = digits()
    model = model_of(mlp(), lr=0.05)
    train(model, x, y, epochs=2, seed=0)
    start = state(model.module)
    ingredients = []
    for seed, lr in ((1, 0.05), (2, 0.02), (3, 0.1), (4, 0.03)):
        model.module.load_state_dict(start)
        model.optimizer = optimizers.create_optimizer("sgd", model.module, (lr, 0.9))
        train(model, x, y, epochs=3, seed=seed)
        ingredients.append(parameters(model.module))
    model.module.load_state_dict(start)
    training.set_data(model, "test", xt, yt, CPU)
    return model, ingredients


def reference_rank(scores: list[float], metric: str = "accuracy") -> list[int]:
    """The ranking of model-soups' main.py: sorted by score from worst to best with Python's stable
    sort, then reversed, so tied ingredients come out last given first. (Its metric is accuracy; for
    loss the score's negation plays that part.)"""
    goodness = [s if metric == "accuracy" else -s for s in scores]
    ranked = sorted(range(len(scores)), key=lambda i: goodness[i])
    ranked.reverse()
    return ranked


def test_a_greedy_soup_of_fine_tuned_digit_models_is_at_least_as_accurate_as_its_best_ingredient(
    fine_tunes: tuple[training.Model, list[TensorDict]],
) -> None:
    model, ingredients = fine_tunes
    before = state(model.module)
    plan = soups.plan_soup(model, ingredients)
    soup = soups.greedy_soup(model, ingredients, plan)

    alone = [accuracy(model, d) for d in ingredients]
    assert soup.scores == pytest.approx(alone, abs=1e-9)
    assert soup.order == reference_rank(soup.scores)
    assert soup.score >= max(alone) and soup.kept[0] == soup.order[0]
    assert soup.score == pytest.approx(accuracy(model, soup.dictionary), abs=1e-9)
    # The soup is the uniform average of the ingredients kept.
    for n, t in soup.dictionary.entries.items():
        mean = torch.stack([ingredients[i].entries[n] for i in soup.kept]).mean(0)
        torch.testing.assert_close(t, mean, rtol=0, atol=1e-6)
    # The oracle's greedy walk gives the same trials and the same choices.
    kept, best, tried = [soup.order[0]], alone[soup.order[0]], [alone[soup.order[0]]]
    for i in soup.order[1:]:
        candidate = TensorDict({
            n: torch.stack([ingredients[j].entries[n] for j in [*kept, i]]).mean(0) for n in ingredients[0].entries
        })
        score = accuracy(model, candidate)
        tried.append(score)
        if score > best:
            kept, best = [*kept, i], score
    assert soup.kept == kept and soup.tried == pytest.approx(tried, abs=1e-9)
    assert all(torch.equal(t, before[n]) for n, t in model.module.state_dict().items())
    assert model.test["metrics"] == "loss"


def test_with_the_loss_metric_lower_is_better(fine_tunes: tuple[training.Model, list[TensorDict]]) -> None:
    model, ingredients = fine_tunes
    soup = soups.greedy_soup(model, ingredients, soups.plan_soup(model, ingredients, [("metric", "loss")]))
    assert soup.metric == "loss"
    assert soup.order == reference_rank(soup.scores, "loss")
    assert soup.score <= min(soup.scores)


def linear_model() -> training.Model:
    module = torch.nn.Linear(2, 2, bias=False)
    model = model_of(module)
    # Class 0 when x0 > x1: the identity weight is perfect, its negation always wrong.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0]])
    training.set_data(model, "test", x, (x[:, 1] > x[:, 0]).long(), CPU)
    return model


def weight(rows: list[list[float]]) -> TensorDict:
    return TensorDict({"weight": torch.tensor(rows, dtype=torch.float32)})


def test_an_ingredient_that_only_ties_the_best_score_is_not_kept() -> None:
    model = linear_model()
    perfect, also_perfect, wrong = weight([[1, 0], [0, 1]]), weight([[2, 0], [0, 2]]), weight([[-1, 0], [0, -1]])
    soup = soups.greedy_soup(model, [wrong, perfect, also_perfect], soups.plan_soup(model, [wrong, perfect, also_perfect]))
    assert soup.scores == [0.0, 100.0, 100.0]
    assert soup.order == [2, 1, 0] and soup.kept == [2]  # the later of the tied first; 100 does not strictly beat 100
    assert soup.tried == [100.0, 100.0, 100.0]  # averaged with `wrong` the weight is 0.5 I, still all right
    assert torch.equal(soup.dictionary.entries["weight"], also_perfect.entries["weight"])


def test_tied_ingredients_are_ranked_last_given_first_as_model_soups_ranks_them() -> None:
    """b and e tie at 75%. The reference's reversed stable sort puts e first, and the soup is that of
    e and a (keeping the given order for ties made it that of b and a: another soup)."""
    model = linear_model()
    a, b, e = weight([[1, 0], [0, 0]]), weight([[0, 0], [0, 1]]), weight([[1, 0], [1, 1]])
    soup = soups.greedy_soup(model, [a, b, e], soups.plan_soup(model, [a, b, e]))
    assert soup.scores == [50.0, 75.0, 75.0]
    assert soup.order == reference_rank(soup.scores) == [2, 1, 0]
    assert soup.kept == [2, 0] and soup.tried == [75.0, 75.0, 100.0] and soup.score == 100.0
    assert torch.equal(soup.dictionary.entries["weight"], torch.tensor([[1.0, 0.0], [0.5, 0.5]]))


def test_with_the_loss_metric_ties_are_ranked_last_given_first_too() -> None:
    """Three copies of one weight tie at any loss: the ranking is the given order reversed."""
    model = linear_model()
    ds = [weight([[1, 0], [0, 1]]) for _ in range(3)]
    soup = soups.greedy_soup(model, ds, soups.plan_soup(model, ds, [("metric", "loss")]))
    assert soup.scores[0] == soup.scores[1] == soup.scores[2]
    assert soup.order == reference_rank(soup.scores, "loss") == [2, 1, 0]


def test_nan_scores_rank_last_and_tie_like_the_others() -> None:
    assert soups._rank("accuracy", [math.nan, 50.0, math.nan, 75.0, 50.0]) == [3, 4, 1, 2, 0]
    assert soups._rank("loss", [math.nan, 0.5, 0.25, math.nan]) == [2, 1, 3, 0]


def test_buffers_the_ingredients_hold_are_souped_and_integer_ones_skipped() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model = model_of(module)
    training.set_data(model, "test", torch.randn(8, 2), torch.randint(0, 2, (8,)), CPU)
    full = {n: t.detach().clone() for n, t in module.state_dict().items()}
    plan = soups.plan_soup(model, [TensorDict(full)])
    assert plan.names == ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var")
    assert footprint.soup_bytes(plan) == {"cpu": 2 * 4 * (4 + 2 + 2 + 2 + 2 + 2)}


def test_the_model_is_put_back_when_the_soup_is_stopped_midway(fine_tunes: tuple[training.Model, list[TensorDict]]) -> None:
    model, ingredients = fine_tunes
    before = state(model.module)
    calls = iter(range(100))
    with pytest.raises(Cancelled):
        soups.greedy_soup(model, ingredients, soups.plan_soup(model, ingredients), lambda: next(calls) > 3)
    assert all(torch.equal(t, before[n]) for n, t in model.module.state_dict().items())
    assert model.test["metrics"] == "loss"


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda m, d: [], InvalidArgument, "at least one ingredient"),
    (lambda m, d: [TensorDict({})], InvalidArgument, "lacks parameter 'weight'"),
    (lambda m, d: [TensorDict({**d.entries, "zz": torch.zeros(1)})], InvalidArgument, "'zz', which is neither"),
    (lambda m, d: [d, TensorDict({"weight": torch.zeros(2, 2, dtype=torch.float64)})], InvalidArgument,
     r"ingredient 2's 'weight' is float64 \[2, 2\] on cpu, the model's is float32 \[2, 2\] on cpu: every ingredient "
     r"needs the model's shapes, dtypes and device \(copy them with copyparms\(m\) \(CopyParameters\), .*nothing changed"),
    (lambda m, d: [TensorDict(dict(m.module.named_parameters()))], InvalidArgument, "live view"),
])
def test_ingredients_that_do_not_fit_are_refused(make, error, message) -> None:  # type: ignore[no-untyped-def]
    model = linear_model()
    with pytest.raises(error, match=message):
        soups.plan_soup(model, make(model, weight([[1, 0], [0, 1]])))


def test_a_soup_needs_test_data_and_a_known_metric() -> None:
    model = model_of(torch.nn.Linear(2, 2, bias=False))
    with pytest.raises(FailedPrecondition, match=r"load it with test\(m, X, Y\)"):
        soups.plan_soup(model, [weight([[1, 0], [0, 1]])])
    with pytest.raises(InvalidArgument, match="must be one of accuracy, loss"):
        soups.plan_soup(linear_model(), [weight([[1, 0], [0, 1]])], [("metric", "f1")])


def test_a_kept_soup_is_the_uniform_average_even_where_scoring_renormalises_weights() -> None:
    """An embedding with max_norm renormalises the rows it reads in place, in eval mode too. The soup
    copied its candidate back from the model after scoring it, so it kept the renormalised rows
    ([[0.97, 0.24], [0, 1]]) where model-soups keeps the candidate it built, the uniform average."""
    module = torch.nn.Sequential(torch.nn.Embedding(2, 2, max_norm=1.0))
    model = model_of(module)
    training.set_data(model, "test", torch.tensor([0, 1]), torch.tensor([0, 1]), CPU)
    a, b = weight([[4, 0], [4, 0]]), weight([[0, 1], [-4, 8]])  # each 50%; their average 100%
    a, b = (TensorDict({"0.weight": d.entries["weight"]}) for d in (a, b))
    soup = soups.greedy_soup(model, [a, b], soups.plan_soup(model, [a, b]))
    assert soup.scores == [50.0, 50.0] and soup.kept == [1, 0] and soup.score == 100.0
    assert torch.equal(soup.dictionary.entries["0.weight"], torch.tensor([[2.0, 0.5], [0.0, 4.0]]))
