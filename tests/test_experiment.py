"""The main job's --quick path end to end: every stage runs, the report's files exist, its numbers are finite, and a
rerun reuses the finished stages."""

import json
import math

import pytest
import soundfile

from models import experiment, report


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    argv = ["--quick", "--out", str(out), "--cache-dir", str(out / "cache"), "--quiet"]
    summary = experiment.main(argv)
    return out, argv, summary


def test_quick_run_writes_the_report(quick_run):
    out, _, summary = quick_run
    for name in ("report.md", "summary.json", "mi_heatmaps.png", "training_curves.png", "nll_bars.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "decode_speed.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "| measure | codec-lambda0 | codec-lambda0.1 |" in text
    rows = report.summary_rows(json.loads((out / "summary.json").read_text()))
    assert len(rows) == 12
    for measure, values in rows:
        assert len(values) == 2 and all(math.isfinite(v) for v in values), measure
    for generation in summary["generation"].values():
        assert len(generation["wavs"]) == generation["batch"]
        for path in generation["wavs"]:
            info = soundfile.info(path)
            assert info.samplerate == 32000 and info.frames == generation["frames"] * 640
    assert summary["lms"]["codec-lambda0/delay"]["nll_per_frame"] > 0


def test_rerun_reuses_finished_stages(quick_run):
    out, argv, summary = quick_run
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*.pt")}
    again = experiment.main(argv)
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*.pt")} == stamps
    assert again["lms"] == summary["lms"] and again["codecs"] == summary["codecs"]


def test_changed_sizes_redo_only_the_stages_they_affect(quick_run):
    out, argv, _ = quick_run
    codecs = {path: path.stat().st_mtime_ns for path in out.glob("codec-*/*.pt")}
    lms = {path: path.stat().st_mtime_ns for path in out.glob("lm-*/lm.pt")}
    assert len(lms) == 4 and codecs
    again = experiment.main(argv + ["--lm-steps", "7"])
    assert {path: path.stat().st_mtime_ns for path in out.glob("codec-*/*.pt")} == codecs
    assert all(path.stat().st_mtime_ns != stamp for path, stamp in lms.items())
    assert {lm["steps"] for lm in again["lms"].values()} == {7}
    assert all(len(lm["train_log"]) == 1 for lm in again["lms"].values())  # logged every 10 steps and at the end


def test_bad_arguments():
    with pytest.raises(SystemExit):
        experiment.main(["--lambda-mmd", "0"])
    with pytest.raises(SystemExit):
        experiment.main(["--quick", "--full"])
