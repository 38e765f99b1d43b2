"""The assignment's target, typed once: at least 99.40% test accuracy in every one of the last 5 epochs, within 15
epochs, with fewer than 8,000 parameters.

Every parameter budget inside tinymnist is inclusive: `max_params` is the most parameters a network may have, for
the assignment as for the smaller budgets of the frontier ("at most 5,000"). The assignment's own words, "fewer than
8,000", are printed from it by `budget_words`."""

from __future__ import annotations

_ASSIGNMENT_BOUND = 8000  # the assignment's words: "fewer than 8,000 parameters"
MAX_PARAMS = _ASSIGNMENT_BOUND - 1  # the assignment's budget, inclusive like every other
MAX_EPOCHS = 15
THRESHOLD = 99.40  # percent, in every one of the last LAST epochs
LAST = 5  # the rule's window: the last epochs that must all pass (evidence records the one it used)
SEEDS = 5  # a check proves the rule over this many seeds, 0..SEEDS-1, not one lucky run
# Reliable means a rate: a step is reliable once a check over seeds 0..RELIABLE_SEEDS-1 on test has at least
# RELIABLE_PASSES seeds that pass, a per-run pass rate of at least 0.78 with 95% confidence. 5 of 5 bounds it only
# at 0.55, which cannot tell a network that almost always passes from one that passes half the time.
RELIABLE_SEEDS = 20
RELIABLE_PASSES = 19
CONFIDENCE = 0.95  # of every pass-rate bound


def budget_words(max_params: int) -> str:
    """A budget as a reader meets it: the assignment's own "< 8,000" for its budget, "≤ N" for any other."""
    return f"< {max_params + 1:,}" if max_params == MAX_PARAMS else f"≤ {max_params:,}"


def budget_phrase(max_params: int) -> str:
    """The same in words: "fewer than 8,000" for the assignment's budget, "at most N" for any other."""
    return f"fewer than {max_params + 1:,}" if max_params == MAX_PARAMS else f"at most {max_params:,}"


def within(params: int, max_params: int = MAX_PARAMS) -> bool:
    """The parameter rule."""
    return params <= max_params


def verdict_word(passed: bool) -> str:
    """A verdict as every page, plot and line prints it."""
    return "PASS" if passed else "FAIL"


def pass_rate_bound(passes: int, seeds: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided lower Clopper-Pearson bound on a run's pass rate after `passes` of `seeds` independent runs
    passed: the p at which passing at least that often has probability 1 - confidence (0 when none passed). Exact:
    the binomial tail is monotone in p, and 200 halvings pin it far below the printed digits."""
    if not 0 <= passes <= seeds or seeds < 1:
        raise ValueError(f"passes must lie in 0..seeds, got {passes} of {seeds}")
    if passes == 0:
        return 0.0
    from math import comb

    def tail(p: float) -> float:  # P(at least `passes` of `seeds` pass | rate p)
        return sum(comb(seeds, i) * p ** i * (1 - p) ** (seeds - i) for i in range(passes, seeds + 1))

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) < 1 - confidence else (lo, mid)
    return lo


def pass_rate_words(passes: int, seeds: int, confidence: float = CONFIDENCE) -> str:
    """A pass rate as every line, card and page states it."""
    return (f"{passes} of {seeds} seeds pass; per-run pass rate ≥ {pass_rate_bound(passes, seeds, confidence):.2f} "
            f"with {confidence:.0%} confidence (Clopper–Pearson)")


def is_reliable(passes: int, seeds: int) -> bool:
    """Reliable: at least RELIABLE_PASSES of a check over at least RELIABLE_SEEDS seeds pass."""
    return seeds >= RELIABLE_SEEDS and passes >= RELIABLE_PASSES
