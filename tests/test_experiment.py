"""The main job's --quick path end to end: every stage runs for two paired seeds, the report's files exist, its
numbers are finite, the paired effects have intervals, and a rerun reuses the finished stages."""

import json
import math

import pytest
import soundfile

from models import experiment, report, stats

# the quick run takes ~2-3 min on 2 quiet cores and up to ~5 min on a shared, loaded machine (pyproject's default
# per-test timeout is 300 s)
QUICK_TIMEOUT_S = 900
FIGURES = ("mi_heatmaps.png", "training_curves.png", "nll_bars.png", "decode_speed.png", "paired_differences.png")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    argv = ["--quick", "--out", str(out), "--cache-dir", str(out / "cache"), "--quiet"]
    summary = experiment.main(argv)
    return out, argv, summary


@pytest.mark.timeout(QUICK_TIMEOUT_S)
def test_quick_run_writes_the_report(quick_run):
    out, _, summary = quick_run
    for name in ("report.md", "summary.json") + FIGURES:
        assert (out / name).stat().st_size > 0, name
    text = (out / "report.md").read_text()
    assert "| measure | codec-lambda0 | codec-lambda1000 | paired difference | 95 % interval | excludes 0 |" in text
    assert "adversarial" in text  # the report says what the CPU run leaves out
    assert summary["seeds"] == [0, 1]
    saved = json.loads((out / "summary.json").read_text())
    assert len(saved["paired"]) == len(report.MEASURES) + 4 * 3  # every measure and every ordered codebook pair
    for measure, effect in saved["paired"].items():
        difference = effect["difference"]
        assert difference["n"] == 2 and len(difference["differences"]) == 2, measure
        assert all(math.isfinite(v) for v in (difference["mean"], difference["low"], difference["high"])), measure
        assert difference["low"] <= difference["mean"] <= difference["high"]
    for seed_runs in summary["runs"].values():
        for run in seed_runs.values():
            assert run["gap"]["low"] <= run["gap"]["estimate"] <= run["gap"]["high"]
            assert run["mi"]["low"][0][1] <= run["mi"]["estimate"][0][1] <= run["mi"]["high"][0][1]
            assert set(run["lms"]) == {"delay", "depth", "flatten"}
            for generation in run["generation"].values():
                assert len(generation["wavs"]) == generation["batch"]
                for path in generation["wavs"]:
                    info = soundfile.info(path)
                    assert info.samplerate == 32000 and info.frames == generation["frames"] * 640
    mmd_codec = summary["runs"]["0"]["codec-lambda1000"]["codec"]
    assert 0 < mmd_codec["mmd_time_share"] < 1
    assert (out / "seed0" / "codec-lambda1000" / "mmd_log.jsonl").exists()


@pytest.mark.timeout(QUICK_TIMEOUT_S)
def test_rerun_reuses_finished_stages(quick_run):
    out, argv, summary = quick_run
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*.pt")}
    again = experiment.main(argv)
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*.pt")} == stamps
    assert again["runs"] == summary["runs"]


@pytest.mark.timeout(QUICK_TIMEOUT_S)
def test_changed_sizes_redo_only_the_stages_they_affect(quick_run):
    out, argv, _ = quick_run
    codecs = {path: path.stat().st_mtime_ns for path in out.glob("seed*/codec-*/*.pt")}
    lms = {path: path.stat().st_mtime_ns for path in out.glob("seed0/lm-*/lm.pt")}
    assert len(lms) == 6 and codecs
    again = experiment.main(argv + ["--lm-steps", "7", "--seeds", "1"])
    assert {path: path.stat().st_mtime_ns for path in out.glob("seed*/codec-*/*.pt")} == codecs
    assert all(path.stat().st_mtime_ns != stamp for path, stamp in lms.items())
    lm_runs = [lm for run in again["runs"]["0"].values() for lm in run["lms"].values()]
    assert {lm["steps"] for lm in lm_runs} == {7}
    assert all(len(lm["train_log"]) == 1 for lm in lm_runs)  # logged every 10 steps and at the end
    # one seed: no interval, and the report says so
    assert all(effect["difference"]["low"] is None for effect in again["paired"].values())
    assert "n/a (one seed)" in (out / "report.md").read_text()


def test_paired_difference_interval():
    effect = stats.paired_difference([1.0, 2.0, 3.0], [2.0, 3.5, 3.9])
    assert effect["mean"] == pytest.approx(1.1333333333)
    half = stats.t_quantile(0.975, 2) * 0.3214550254 / math.sqrt(3)  # sd of (1, 1.5, 0.9)
    assert effect["low"] == pytest.approx(effect["mean"] - half, rel=1e-6) and effect["excludes_zero"]
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert stats.t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-3)
    assert not stats.paired_difference([0.0, 1.0], [1.0, 0.0])["excludes_zero"]


def test_bad_arguments():
    with pytest.raises(SystemExit):
        experiment.main(["--lambda-mmd", "0"])
    with pytest.raises(SystemExit):
        experiment.main(["--quick", "--full"])
    with pytest.raises(SystemExit):
        experiment.main(["--quick", "--seeds", "0", "--out", "/nonexistent/never"])
