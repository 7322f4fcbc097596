"""Selection machinery: canonical order, select()'s checks on misbehaving strategies, measures, registry, params."""

import math
import textwrap

import numpy as np
import pytest

from strategies.base import Candidates, QueryContext, QueryStrategy, Shard, StrategyError
from strategies.order import order, tiebreak, top
from strategies.registry import BUILTINS, load_strategy
from strategies.select import select
from strategies.shards import array_shards

CTX = QueryContext(round=1, seed=3, n_classes=2)


def _ids(n: int) -> np.ndarray:
    return np.array([f"i{k}" for k in range(n)], dtype=object)


# --- canonical order -------------------------------------------------------------------------------------------


def test_tiebreak_depends_on_seed_round_and_id_only():
    ids = _ids(50)
    assert tiebreak(ids, CTX)[7] == tiebreak(ids[7:8], CTX)[0]  # not on the array's width or neighbours
    assert tiebreak(np.array(["a"]), CTX)[0] == tiebreak(np.array(["a", "a-much-longer-id"]), CTX)[0]
    assert (tiebreak(ids, CTX) != tiebreak(ids, QueryContext(2, 3, 2))).any()
    assert (tiebreak(ids, CTX) != tiebreak(ids, QueryContext(1, 4, 2))).any()
    assert len(set(tiebreak(_ids(10_000), CTX).tolist())) == 10_000


def test_grouped_order_is_round_robin_best_first():
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.5])
    groups = np.array([0, 0, 0, 1, 2])
    got = order(scores, groups, np.zeros(5, dtype=np.uint64)).tolist()
    assert got == [0, 4, 3, 1, 2]  # each group's best (by score), then group 0's second and third


class _FixedScores(QueryStrategy):
    """Scores (and groups) given per id up front."""

    def __init__(self, row: dict[str, int], scores: np.ndarray, groups: np.ndarray | None):
        self.row, self.scores, self.groups = row, scores, groups

    def candidates(self, shard, n, ctx):
        at = np.array([self.row[i] for i in shard.ids])
        return top(shard.ids, self.scores[at], n, ctx, None if self.groups is None else self.groups[at])


@pytest.mark.parametrize("grouped", [False, True])
def test_merging_shard_tops_equals_whole_pool_top(grouped):
    rng = np.random.default_rng(0)
    for trial in range(30):
        size = int(rng.integers(1, 400))
        ids, scores = _ids(size), rng.integers(0, 5, size).astype(float)  # many ties
        groups = rng.integers(0, 6, size) if grouped else np.zeros(size, dtype=int)
        row = {i: k for k, i in enumerate(ids)}
        n = int(rng.integers(1, size + 3))
        fixed = _FixedScores(row, scores, groups if grouped else None)
        cuts = np.sort(rng.choice(np.arange(1, size), size=min(size - 1, 5), replace=False))
        got = select(fixed, [Shard(part) for part in np.split(ids, cuts)], n, CTX).tolist()
        assert got == top(ids, scores, n, CTX, groups if grouped else None).ids.tolist(), trial


# --- select(): the checks that stop a misbehaving strategy ------------------------------------------------------


class _Bad(QueryStrategy):
    name = "bad"

    def __init__(self, make):
        self.make = make

    def candidates(self, shard, n, ctx):
        return self.make(shard, n)


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda s, n: 1 / 0, "candidates\\(\\) raised ZeroDivisionError"),
        (lambda s, n: s.ids[:n].tolist(), "returned a list, not Candidates"),
        (lambda s, n: Candidates(np.r_[s.ids[: n - 1], ["ghost"]], np.zeros(n)), "'ghost', which is not in the shard"),
        (lambda s, n: Candidates(np.r_[s.ids[: n - 1], s.ids[:1]], np.zeros(n)), "more than once"),
        (lambda s, n: Candidates(s.ids[: n + 1], np.zeros(n + 1)), "at most 4 allowed"),
        (lambda s, n: Candidates(s.ids[: n - 1], np.zeros(n - 1)), "expected min\\(n, shard size\\) = 4"),
        (lambda s, n: Candidates(s.ids[:n], np.zeros(n - 1)), "scores of shape"),
        (lambda s, n: Candidates(s.ids[:n], np.full(n, np.nan)), "NaN or infinite"),
        (lambda s, n: Candidates(s.ids[:n], np.array(["x"] * n)), "not numbers"),
    ],
)
def test_select_stops_a_misbehaving_strategy(make, problem):
    with pytest.raises(StrategyError, match=f"strategy 'bad': .*{problem}"):
        select(_Bad(make), array_shards(_ids(20), size=8), 4, CTX)


def test_an_annotated_id_is_refused():
    ids, annotated = _ids(20), np.arange(20) < 5
    leak = _Bad(lambda s, n: Candidates(np.r_[["i0"], s.ids[: n - 1]], np.zeros(n)))  # i0 is annotated
    with pytest.raises(StrategyError, match="'i0', which is not in the shard .*already annotated"):
        select(leak, array_shards(ids, rows=~annotated), 4, CTX)


def test_fit_failures_and_one_shot_iterators():
    class FitFails(QueryStrategy):
        def fit(self, shards, ctx):
            raise RuntimeError("no centroids")

        def candidates(self, shard, n, ctx):
            return top(shard.ids, np.zeros(len(shard)), n, ctx)

    with pytest.raises(StrategyError, match="strategy 'FitFails': fit\\(\\) raised RuntimeError: no centroids"):
        select(FitFails(), [Shard(_ids(5))], 2, CTX)
    with pytest.raises(ValueError, match="reads the pool twice"):
        select(FitFails(), iter([Shard(_ids(5))]), 2, CTX)


def test_caller_errors_are_not_blamed_on_the_strategy():
    s = load_strategy("uncertainty")
    with pytest.raises(ValueError, match="probs has shape") as e:
        select(s, [Shard(_ids(3), probs=np.ones((3, 5)) / 5)], 2, CTX)
    assert not isinstance(e.value, StrategyError)
    with pytest.raises(ValueError, match="set in some shards and None in others"):
        select(s, [Shard(_ids(3), probs=np.full((3, 2), 0.5)), Shard(_ids(6)[3:])], 2, CTX)
    with pytest.raises(ValueError, match="more than one shard"):
        select(load_strategy("random"), [Shard(_ids(3)), Shard(_ids(3))], 6, CTX)
    with pytest.raises(ValueError, match="Shard.probs has 2 rows"):
        Shard(_ids(3), probs=np.ones((2, 2)))


def test_select_hides_undeclared_columns():
    seen = []

    class Peek(QueryStrategy):
        needs = frozenset({"slm_labels"})

        def candidates(self, shard, n, ctx):
            seen.append((shard.probs, shard.embeddings, shard.llm_labels, shard.slm_labels is not None))
            return top(shard.ids, np.zeros(len(shard)), n, ctx)

    full = Shard(
        _ids(4),
        probs=np.full((4, 2), 0.5),
        embeddings=np.ones((4, 3)),
        llm_labels=np.zeros(4, int),
        slm_labels=np.ones(4, int),
    )
    select(Peek(), [full], 2, CTX)
    assert seen == [(None, None, None, True)]


# --- built-ins ------------------------------------------------------------------------------------------------


def test_uncertainty_measures_go_through_modal_and_match_their_formulas():
    from strategies.measures import uncertainty

    p = np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]])
    ent = -(p * np.log(p)).sum(1)
    np.testing.assert_allclose(uncertainty(p, "entropy"), ent)
    np.testing.assert_allclose(uncertainty(p, "margin"), 1 - np.array([0.2, 0.85, 0.0]))
    np.testing.assert_allclose(uncertainty(p, "least_confidence"), [0.5, 0.1, 2 / 3])
    assert uncertainty(p, "entropy").argmax() == 2 and math.isclose(ent[2], math.log(3))


def test_uncertainty_picks_the_least_certain_and_falls_back_to_random_without_probs():
    ids = _ids(6)
    probs = np.array([[0.99, 0.01], [0.5, 0.5], [0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.97, 0.03]])
    s = load_strategy("uncertainty", {"measure": "margin"})
    assert select(s, [Shard(ids, probs=probs)], 3, CTX).tolist() == ["i1", "i3", "i4"]
    assert select(s, [Shard(ids)], 3, CTX).tolist() == select(load_strategy("random"), [Shard(ids)], 3, CTX).tolist()


def test_random_is_seeded_and_changes_with_round():
    s, ids = load_strategy("random"), _ids(100)
    a = select(s, [Shard(ids)], 10, CTX).tolist()
    assert a == select(s, [Shard(ids)], 10, CTX).tolist()
    assert a != select(s, [Shard(ids)], 10, QueryContext(2, 3, 2)).tolist()


def test_diversity_spreads_picks_over_clusters_and_hybrid_takes_the_uncertain_in_each():
    rng = np.random.default_rng(1)
    centers = np.eye(4, 8) * 10
    which = np.repeat(np.arange(4), [400, 30, 30, 30])  # one big cluster: uncertainty alone would stay in it
    emb = (centers[which] + rng.normal(size=(len(which), 8))).astype(np.float32)
    p1 = np.where(which == 0, 0.5 + rng.uniform(0, 0.02, len(which)), 0.7 + rng.uniform(0, 0.2, len(which)))
    probs = np.stack([p1, 1 - p1], 1)
    ids = _ids(len(which))
    shards = array_shards(ids, probs=probs, embeddings=emb, size=100)
    ctx = QueryContext(1, 0, 2)
    covered = lambda picked: {int(which[int(i[1:])]) for i in picked}
    assert covered(select(load_strategy("uncertainty"), shards, 8, ctx)) == {0}
    assert covered(select(load_strategy("diversity", {"n_clusters": 4}), shards, 8, ctx)) == {0, 1, 2, 3}
    hybrid = select(load_strategy("hybrid", {"n_clusters": 4}), shards, 8, ctx).tolist()
    assert covered(hybrid) == {0, 1, 2, 3}
    for c in range(1, 4):  # within each small cluster, the two most uncertain rows
        rows = np.flatnonzero(which == c)
        best = set(ids[rows[np.argsort(-(1 - np.abs(probs[rows, 0] - probs[rows, 1])))[:2]]].tolist())
        assert best == {i for i in hybrid if which[int(i[1:])] == c}


def test_disagreement_prefers_flipped_predictions_then_least_confidence():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.55, 0.45]])
    slm = np.array([1, 0, -1, 0])  # row 0 flipped (score 0.9); rows 1 and 3 agree; row 2 has no old label
    llm = np.array([-1, 1, -1, -1])  # row 1 carries an LLM label the SLM contradicts (score 0.6)
    shard = Shard(_ids(4), probs=probs, llm_labels=llm, slm_labels=slm)
    assert select(load_strategy("disagreement"), [shard], 4, CTX).tolist() == ["i0", "i1", "i3", "i2"]


# --- registry and params --------------------------------------------------------------------------------------


def test_registry_resolves_builtins_modules_files_and_entry_points(tmp_path, monkeypatch):
    for name in BUILTINS:
        assert load_strategy(name).name == name
    assert type(load_strategy("strategies.random:RandomStrategy")).__name__ == "RandomStrategy"
    (tmp_path / "my_strats.py").write_text(
        textwrap.dedent("""
        import numpy as np
        from strategies.base import QueryStrategy
        from strategies.order import top
        class Longest(QueryStrategy):
            def __init__(self, bonus: float = 0.0):
                self.bonus = bonus
            def candidates(self, shard, n, ctx):
                return top(shard.ids, np.array([len(i) for i in shard.ids]) + self.bonus, n, ctx)
    """)
    )
    assert load_strategy(f"{tmp_path / 'my_strats.py'}:Longest", {"bonus": 1}).bonus == 1
    dist = tmp_path / "my_strats-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-strats\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[freeal_stream.strategies]\nlongest = my_strats:Longest\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    s = load_strategy("longest", {"bonus": 2.5})
    assert select(s, [Shard(np.array(["a", "ccc", "bb"], dtype=object))], 1, CTX).tolist() == ["ccc"]


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("nope", {}, "strategy 'nope': unknown strategy"),
        ("no_such_mod:X", {}, "strategy 'no_such_mod:X': cannot import 'no_such_mod'"),
        ("strategies.random:Nope", {}, "defines no 'Nope'"),
        ("/no/such/file.py:X", {}, "cannot import '/no/such/file.py' \\(FileNotFoundError"),
        ("strategies.base:Shard", {}, "is not a subclass of strategies.base.QueryStrategy"),
        ("random", {"temperature": 3}, "strategy 'random': unknown parameter 'temperature'. Fix: use none"),
        ("hybrid", {"n_cluster": 3}, "unknown parameter 'n_cluster'. Fix: use one of \\['batch_rows', 'measure'"),
        ("hybrid", {"n_clusters": "8"}, "parameter 'n_clusters' must be int, got '8'"),
        ("hybrid", {"n_clusters": True}, "parameter 'n_clusters' must be int, got True"),
        ("uncertainty", {"measure": "gini"}, "parameter 'measure' must be one of 'entropy', 'margin'"),
        ("diversity", {"n_clusters": 0}, "strategy 'diversity': bad parameters .*n_clusters must be >= 1"),
    ],
)
def test_registry_errors_name_the_strategy_and_the_parameter(name, params, message):
    with pytest.raises(StrategyError, match=message):
        load_strategy(name, params)


def test_params_missing_and_optional_types(tmp_path):
    (tmp_path / "needy.py").write_text(
        textwrap.dedent("""
        from strategies.base import QueryStrategy
        class Needy(QueryStrategy):
            needs = frozenset({"probs", "logits"})
            def __init__(self, k: int, rate: float | None = None):
                self.k, self.rate = k, rate
    """)
    )
    path = f"{tmp_path / 'needy.py'}:Needy"
    with pytest.raises(StrategyError, match="missing parameter 'k'"):
        load_strategy(path, {})
    with pytest.raises(StrategyError, match="parameter 'rate' must be float or null, got 'x'"):
        load_strategy(path, {"k": 1, "rate": "x"})
    with pytest.raises(StrategyError, match="needs unknown column\\(s\\) \\['logits'\\]"):
        load_strategy(path, {"k": 1, "rate": None})


def test_route_sends_the_texts_the_slm_is_least_likely_to_get_right():
    """Least confidence, not entropy: [0.5, 0.5, 0] is less likely right (0.5) than [0.55, 0.225, 0.225] (0.55),
    although its entropy is lower."""
    ctx = QueryContext(round=2, seed=3, n_classes=3)
    probs = np.array([[0.5, 0.5, 0.0], [0.45, 0.3, 0.25], [0.9, 0.05, 0.05]], dtype=np.float32)
    shard = Shard(np.array(["a", "b", "c"], dtype=object), probs=probs)
    assert select(load_strategy("route"), [shard], 1, ctx).tolist() == ["b"]
    assert select(load_strategy("uncertainty"), [shard], 1, ctx).tolist() == ["b"]  # entropy agrees here...
    flat = np.array([[0.5, 0.5, 0.0], [0.55, 0.225, 0.225], [0.9, 0.05, 0.05]], dtype=np.float32)
    shard = Shard(np.array(["a", "b", "c"], dtype=object), probs=flat)
    assert select(load_strategy("route"), [shard], 1, ctx).tolist() == ["a"]  # ...not here: 0.5 < 0.55
    assert select(load_strategy("uncertainty"), [shard], 1, ctx).tolist() == ["b"]
