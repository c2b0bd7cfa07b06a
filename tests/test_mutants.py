"""The mutation check (``python -m lmms_sd.testing.mutants``): every mutant is a one-line edit of
the real core source, and a fast subset is caught by the tests here (the full list runs from
the script; the README gives its time)."""
from __future__ import annotations

import pytest

from lmms_sd.testing.mutants import MUTANTS, REPO, check

FAST = [m for m in MUTANTS if m.fast]
FAST_DRAWS = {"LMMS_SD_STAT_DRAWS": "400"}  # power against these mutants is ~1 at 400 draws


def test_every_mutant_is_one_edit_of_the_real_source():
    assert len({m.name for m in MUTANTS}) == len(MUTANTS) >= 7
    for m in MUTANTS:
        text = (REPO / "lmms_sd" / m.path).read_text()
        assert text.count(m.old) == 1, f"{m.name}: the text to replace is not in lmms_sd/{m.path}"
        assert "\n" not in m.old.strip("\n") and m.old != m.new, m.name
        assert all((REPO / t.split("::")[0]).is_file() for t in m.tests), m.name


@pytest.mark.slow
@pytest.mark.parametrize("mutant", FAST, ids=[m.name for m in FAST])
def test_fast_mutants_are_caught(mutant):
    outcome = check(mutant, mutant.tests, env=FAST_DRAWS)
    assert outcome.status == 1, f"{mutant.name}: {outcome.verdict}\n{outcome.tail}"
