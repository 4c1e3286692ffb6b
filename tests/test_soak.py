"""A short soak in CI (`make soak` runs 1,000): nothing fails, memory holds, nothing is left in /tmp."""

import json

from scripts.soak import main


def test_short_soak(tmp_path):
    assert main(["-n", "60", "--json", str(tmp_path / "soak.json")]) == 0
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["predictions"] == 60 and report["failures"] == []
    assert report["memory_growth"] <= 0.10 and report["temp_files_left"] == []
