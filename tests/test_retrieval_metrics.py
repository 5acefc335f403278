"""Retrieval metrics on hand-built similarity matrices with known answers."""

import itertools

import numpy as np
import pytest

from unime_jax.eval.retrieval import compositional_scores, gold_mask, hits_at_k, recall_at_k

SIM = np.array(
    [
        [0.9, 0.1, 0.2],  # gold 0: top → hit
        [0.3, 0.2, 0.8],  # gold 2: top → hit
        [0.5, 0.6, 0.1],  # gold 0: second → miss at 1, hit at 2
    ]
)


def test_recall_at_k_known_answers():
    assert recall_at_k(SIM, [0, 2, 0], k=1) == pytest.approx(2 / 3)
    assert recall_at_k(SIM, np.array([0, 2, 0]), k=2) == 1.0
    assert recall_at_k(SIM, [1, 0, 2], k=1) == 0.0
    assert recall_at_k(SIM, [1, 0, 2], k=2) == pytest.approx(1 / 3)  # only query 1 (0.3 ranks 2nd)
    assert recall_at_k(SIM, [1, 0, 2], k=3) == 1.0
    assert hits_at_k(SIM, [0, 2, 0]).tolist() == [1.0, 1.0, 0.0]


def test_recall_with_gold_sets_and_masks():
    assert recall_at_k(SIM, [{0}, {2}, {0, 1}]) == 1.0  # query 2's top (1) is acceptable
    assert recall_at_k(SIM, [{1, 2}, [0, 2], (0,)]) == pytest.approx(1 / 3)
    mask = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=bool)
    assert recall_at_k(SIM, mask) == recall_at_k(SIM, [{0}, {2}, {0, 1}]) == 1.0
    np.testing.assert_array_equal(gold_mask([0, {1, 2}], 2, 3), [[1, 0, 0], [0, 1, 1]])


def test_non_square_matrix():
    sim = np.array([[0.1, 0.7, 0.3, 0.2], [0.4, 0.0, 0.2, 0.3]])
    assert recall_at_k(sim, [1, 0]) == 1.0
    assert recall_at_k(sim, [2, 3]) == 0.0
    assert recall_at_k(sim, [2, 3], k=2) == 1.0


def test_all_equal_similarities_are_not_a_free_hit():
    sim = np.full((4, 4), 0.5)
    assert recall_at_k(sim, np.arange(4), k=1) == 0.0
    assert recall_at_k(sim, np.arange(4), k=3) == 0.0
    assert recall_at_k(sim, np.arange(4), k=4) == 1.0
    assert recall_at_k(sim, [set(range(4))] * 4, k=1) == 1.0  # every candidate is gold


def test_tie_rule_ignores_index_order():
    sim = np.array([[0.5, 0.5, 0.1]])
    # gold tied with a non-gold: a miss whichever of the two is gold (no lower-index-wins bias)
    assert recall_at_k(sim, [0]) == 0.0
    assert recall_at_k(sim, [1]) == 0.0
    assert recall_at_k(sim, [0], k=2) == 1.0
    # a strictly higher gold is still a hit, and a tie below the top does not matter
    assert recall_at_k(np.array([[0.9, 0.5, 0.5]]), [0]) == 1.0


def test_results_invariant_to_candidate_permutation():
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 3, size=(30, 6)).astype(float)  # many ties
    gold = rng.integers(0, 6, size=30)
    for perm in itertools.islice(itertools.permutations(range(6)), 0, 720, 97):
        perm = np.asarray(perm)
        inverse = np.argsort(perm)
        for k in (1, 2):
            assert recall_at_k(sim[:, perm], inverse[gold], k) == recall_at_k(sim, gold, k)


def _brute_force_hit_rate(row, gold_set, k):
    """Average hit@k over every order that sorts by score (ties in every possible order)."""
    hits = total = 0
    for order in itertools.permutations(range(len(row))):
        if all(row[a] >= row[b] for a, b in itertools.pairwise(order)):
            total += 1
            hits += bool(set(order[:k]) & gold_set)
    return hits / total


def test_ties_take_the_worst_order_by_brute_force():
    """A hit only if every order of the tied candidates is a hit."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        row = rng.integers(0, 3, size=6).astype(float)
        gold = set(rng.choice(6, size=int(rng.integers(1, 3)), replace=False).tolist())
        for k in (1, 2, 3):
            assert hits_at_k(row[None], [gold], k)[0] == float(_brute_force_hit_rate(row, gold, k) == 1.0)


@pytest.mark.parametrize(
    ("sim", "gold", "k"),
    [
        (np.array([[0.1, np.nan]]), [0], 1),
        (np.ones((2, 3)), [0, 3], 1),
        (np.ones((2, 3)), [0, -1], 1),
        (np.ones((2, 3)), [0], 1),
        (np.ones((2, 3)), [{0}, set()], 1),
        (np.ones((2, 3)), [0, 1], 0),
        (np.ones(3), [0], 1),
        (np.ones((2, 3)), np.ones((3, 2), dtype=bool), 1),
    ],
)
def test_bad_inputs_rejected(sim, gold, k):
    with pytest.raises(ValueError):
        recall_at_k(sim, gold, k)


# --- compositional accuracy -----------------------------------------------------------------------


def test_compositional_scores_are_strict():
    images = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    true = np.array([[0.9, 0.1], [0.2, 0.9], [0.6, 0.8], [0.0, 1.0]])
    twin = np.array([[0.5, 0.5], [0.3, 0.9], [0.6, 0.0], [1.0, 0.0]])
    # wins: 0.9 > 0.5, 0.2 < 0.3 (loss), 0.6 == 0.6 (tie: wrong), 1 > 0
    assert compositional_scores(images, true, twin).tolist() == [True, False, False, True]
    assert not compositional_scores(images, true, true).any()  # identical twin: all ties, all wrong
    assert compositional_scores(images, twin, true).tolist() == [False, True, False, False]
    with pytest.raises(ValueError):
        compositional_scores(images, true, twin[:3])
