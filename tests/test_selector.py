"""Algorithm 1: the runner-up is kept iff p2 >= tau and a2 != a1."""

import pytest

from onevlm.router.selector import Index, select_answer


def test_keeps_first_below_cutoff():
    sel = select_answer("brain CT scan", 0.6, "chest CT scan", 0.3, 0.4)
    assert (sel.answer, sel.index) == ("brain CT scan", Index.FIRST)


def test_switches_at_and_above_cutoff():
    at = select_answer("a", 0.55, "b", 0.4, 0.4)
    above = select_answer("a", 0.5, "b", 0.45, 0.4)
    assert (at.answer, at.index) == ("b", Index.SECOND)  # p2 == tau counts (>=)
    assert (above.answer, above.index) == ("b", Index.SECOND)


def test_same_answer_never_switches():
    sel = select_answer("None", 0.5, "None", 0.49, 0.1)
    assert (sel.answer, sel.index) == ("None", Index.FIRST)


def test_no_cutoff_is_the_baseline():
    sel = select_answer("a", 0.5, "b", 0.5, None)
    assert sel.index is Index.FIRST


def test_single_candidate():
    sel = select_answer("a", 1.0, None, None, 0.0)
    assert (sel.answer, sel.index) == ("a", Index.FIRST)


def test_tau_zero_always_switches_to_a_different_runner_up():
    assert select_answer("a", 0.99, "b", 0.0, 0.0).index is Index.SECOND


@pytest.mark.parametrize("p1,p2,tau", [(0.3, 0.4, 0.5), (1.2, 0.1, 0.5), (0.5, 0.1, -0.1), (0.5, float("nan"), 0.2)])
def test_rejects_invalid_probabilities(p1, p2, tau):
    with pytest.raises(ValueError):
        select_answer("a", p1, "b", p2, tau)
