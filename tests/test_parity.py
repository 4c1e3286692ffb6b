"""Control units (#19) changed the request path, not its outputs: every condition's images, for each
input set of scripts/parity_hashes.py, are bit-identical to those of the code before the change (the
fixture says which commit made them). On a CPU other than the fixture's, that commit's code run on this
machine is the reference (scripts.parity_hashes.expected): still bit for bit, on any CPU."""

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
def test_outputs_are_bit_identical_to_the_code_before_units(condition, tmp_path, parity_reference):
    hashes, source = parity_reference
    with reference.one_thread():
        got = reference.condition_hashes(condition, tmp_path)
    expected = hashes[condition]
    changed = sorted(case for case in expected if got.get(case) != expected[case])
    assert not changed, f"{condition}: outputs differ from {source} for {changed}"
    assert sorted(got) == sorted(expected)


def _fake_fixture(platform: dict) -> dict:
    return {"commit": "0" * 40, "platform": platform, "inputs": FIXTURE["inputs"], "hashes": {"canny": {"x": ["a"]}}}


@pytest.fixture
def no_build(monkeypatch):
    def refuse(commit, out):
        raise AssertionError("built a reference where one was at hand")

    monkeypatch.setattr(reference, "build_reference", refuse)


def test_the_fixture_is_the_reference_only_on_the_platform_that_made_it(no_build, tmp_path):
    here = reference.platform_info()
    assert reference.expected(_fake_fixture(here), tmp_path)[0] == {"canny": {"x": ["a"]}}
    # The original fixture did not record its CPU: no machine takes it as its own.
    unrecorded = {k: v for k, v in here.items() if k != "cpu"}
    with pytest.raises(AssertionError, match="built a reference"):
        reference.expected(_fake_fixture(unrecorded), tmp_path)
    other_cpu = dict(here, cpu="GenuineIntel Some Xeon AVX2")
    with pytest.raises(AssertionError, match="built a reference"):
        reference.expected(_fake_fixture(other_cpu), tmp_path)


def test_a_reference_for_this_cpu_in_the_fixture_or_the_cache_is_used(no_build, tmp_path):
    here = reference.platform_info()
    fixture = _fake_fixture(dict(here, cpu="another CPU"))
    fixture["references"] = {reference.platform_key(here): {"platform": here, "inputs": FIXTURE["inputs"],
                                                            "hashes": {"canny": {"x": ["committed"]}}}}
    assert reference.expected(fixture, tmp_path)[0] == {"canny": {"x": ["committed"]}}
    del fixture["references"]
    slug = reference.hashlib.sha256(reference.platform_key(here).encode()).hexdigest()[:16]
    cached = tmp_path / f"{'0' * 12}-{slug}.json"
    cached.write_text(json.dumps({"platform": here, "inputs": FIXTURE["inputs"], "hashes": {"canny": {"x": ["cached"]}}}))
    hashes, source = reference.expected(fixture, tmp_path)
    assert hashes == {"canny": {"x": ["cached"]}} and "run on this machine" in source
    # A cache made from other input sets is not this fixture's reference.
    cached.write_text(json.dumps({"platform": here, "inputs": {}, "hashes": {}}))
    with pytest.raises(AssertionError, match="built a reference"):
        reference.expected(fixture, tmp_path)


def test_a_reference_needs_its_commit_and_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="needs commit f{40} of this repository's history"):
        reference.build_reference("f" * 40, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
