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
