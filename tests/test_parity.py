"""Control units (#19) changed the request path, not its outputs: every condition's images, for each
input set of scripts/parity_hashes.py, are bit-identical to those of the code before the change (the
fixture says which commit made them)."""

import json

import pytest

from scripts import parity_hashes as reference

FIXTURE = json.loads(reference.FIXTURE.read_text())


def test_the_fixture_was_made_from_these_input_sets():
    inputs = {"fast": reference.FAST, "cases": reference.CASES, "shared_cases": reference.SHARED_CASES,
              "options": reference.OPTIONS}
    assert FIXTURE["inputs"] == json.loads(json.dumps(inputs))
    assert sorted(FIXTURE["hashes"]) == sorted(reference.CONDITIONS)


@pytest.mark.parametrize("condition", reference.CONDITIONS)
def test_outputs_are_bit_identical_to_the_code_before_units(condition, tmp_path):
    with reference.one_thread():
        got = reference.condition_hashes(condition, tmp_path)
    expected = FIXTURE["hashes"][condition]
    changed = sorted(case for case in expected if got.get(case) != expected[case])
    assert not changed, (
        f"{condition}: outputs differ from commit {FIXTURE['commit'][:10]}'s for {changed} (fixture made with "
        f"{FIXTURE['platform']}; this run: {reference.platform_info()})"
    )
    assert sorted(got) == sorted(expected)
