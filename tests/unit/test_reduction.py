"""The canonical sum of a pass (sae/sums.py): groups of ⌈√U⌉ units folded in order, then a fixed tree."""

from __future__ import annotations

import numpy as np
import pytest

from dist_sae.sae.sums import OrderedReducer, TreeSum, fold, group_size, unit_groups


def level_tree(items):
    """The docstring's rule, level by level: pairs (0, 1), (2, 3), ...; an odd last one goes up."""
    while len(items) > 1:
        pairs = [(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]
        items = pairs + ([items[-1]] if len(items) % 2 else [])
    return items[0]


def unit_sums(n: int, p: int = 50, seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """Per-unit sums with widely spread magnitudes, so a different association changes bits."""
    rng = np.random.default_rng(seed)
    return {uid: {"grad": rng.standard_normal(p) * 10.0 ** rng.integers(-8, 8, p), "rows": np.array(float(uid + 1))}
            for uid in range(3, 3 + n)}


def canonical(parts: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """An independent implementation: level-by-level tree over left folds of the groups."""
    groups = [fold(parts[u] for u in group) for group in unit_groups(parts)]
    while len(groups) > 1:
        nxt = [{k: groups[i][k] + groups[i + 1][k] for k in groups[i]} for i in range(0, len(groups) - 1, 2)]
        groups = nxt + ([groups[-1]] if len(groups) % 2 else [])
    return groups[0]


@pytest.mark.parametrize("n", range(1, 41))
def test_tree_sum_has_the_level_by_level_shape(n):
    tree = TreeSum(lambda a, b: (a, b))
    for i in range(n):
        tree.push(i)
    assert tree.result() == level_tree(list(range(n)))


def test_groups_are_consecutive_runs_set_by_the_unit_count_alone():
    assert [group_size(u) for u in (1, 2, 4, 5, 9, 10, 30, 244)] == [1, 2, 2, 3, 3, 4, 6, 16]
    assert unit_groups([7, 3, 5, 4, 6]) == [[3, 4, 5], [6, 7]]


@pytest.mark.parametrize("n", [1, 2, 7, 30, 50])
def test_any_arrival_order_gives_the_canonical_bits(n):
    parts = unit_sums(n)
    expected = canonical(parts)
    rng = np.random.default_rng(n)
    for _ in range(5):
        reducer = OrderedReducer(list(parts))
        for uid in rng.permutation(list(parts)):
            reducer.add(int(uid), parts[int(uid)])
        assert reducer.done and all(np.array_equal(reducer.total[k], expected[k]) for k in expected)
    # Whole groups folded elsewhere, arriving in any order: the same bits.
    groups = unit_groups(parts)
    reducer = OrderedReducer(list(parts))
    for j in rng.permutation(len(groups)):
        reducer.add_group(int(j), fold(parts[u] for u in groups[int(j)]))
    assert all(np.array_equal(reducer.total[k], expected[k]) for k in expected)


def test_the_association_matters_so_every_mode_must_share_it():
    parts = unit_sums(30)
    flat = fold(parts[u] for u in sorted(parts))
    assert not np.array_equal(flat["grad"], canonical(parts)["grad"])  # the fixed order is what makes bits equal


def test_a_unit_reduced_twice_is_an_error():
    parts = unit_sums(4)
    reducer = OrderedReducer(list(parts))
    reducer.add(3, parts[3])
    with pytest.raises(RuntimeError, match="reduced twice"):
        reducer.add(3, parts[3])
    with pytest.raises(RuntimeError, match="not in this pass"):
        reducer.add(99, parts[3])
