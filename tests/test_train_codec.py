"""The codec training entry point end to end on tiny data: train, log, checkpoint, resume, evaluate, encode/decode."""

import json
import math

import numpy as np
import pytest
import soundfile
import torch

from models import train_codec

TINY = [
    "--channels",
    "4",
    "--latent-dim",
    "16",
    "--codebook-size",
    "16",
    "--batch-size",
    "2",
    "--segment-seconds",
    "0.64",
    "--log-every",
    "1",
    "--quiet",
]


def write_tones(folder, count=4, seconds=2.0, sample_rate=32000):
    folder.mkdir()
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    for i in range(count):
        tone = 0.3 * np.sin(2 * np.pi * (220 + 55 * i) * t) * np.exp(-t)
        soundfile.write(folder / f"piece{i}.wav", tone.astype(np.float32), sample_rate)


def test_train_resume_evaluate_encode_decode(tmp_path):
    audio = tmp_path / "audio"
    write_tones(audio)
    out = tmp_path / "run"
    common = ["train", "--out", str(out), "--audio-dir", str(audio), "--valid-fraction", "0.25", "--lambda-mmd", "1.0"]
    report = train_codec.main(common + ["--steps", "3", "--checkpoint-every", "2"] + TINY)
    assert (out / "last.pt").exists() and (out / "eval.json").exists()
    assert np.isfinite(report["mel_distance"]) and np.isfinite(report["si_snr_db"])
    assert len(report["dependence"]["mutual_information"]) == 4
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and "mmd" in records[0]
    assert (out / "log.csv").read_text().splitlines()[0].startswith("step,")

    train_codec.main(common + ["--steps", "5"] + TINY)  # resumes at step 3
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 5

    codes = tmp_path / "codes.pt"
    decoded = tmp_path / "decoded.wav"
    train_codec.main(["encode", "--checkpoint", str(out / "last.pt"), str(audio / "piece0.wav"), str(codes)])
    train_codec.main(["decode", "--checkpoint", str(out / "last.pt"), str(codes), str(decoded)])
    samples, rate = soundfile.read(decoded)
    assert rate == 32000 and samples.shape[0] == 64000 and np.isfinite(samples).all()
    assert torch.load(codes)["codes"].shape == (1, 4, 100)


def test_compare_prints_a_table(tmp_path, capsys):
    report = {"mel_distance": 1.0, "si_snr_db": 2.0}
    dependence = {
        "mean_offdiag_mutual_information": 0.1,
        "mean_offdiag_normalized_mutual_information": 0.2,
        "total_correlation": 0.3,
    }
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(
            json.dumps({**report, "dependence": dependence, "dependence_delay": dependence})
        )
    table = train_codec.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert table.splitlines()[0] == "| measure | a | b |" and "| 0.3000 | 0.3000 |" in table


def test_si_snr_of_a_scaled_copy_is_high():
    x = torch.randn(2, 1, 1000)
    assert (train_codec.si_snr(3.0 * x, x) > 60).all()
    assert (train_codec.si_snr(torch.randn(2, 1, 1000), x) < 5).all()


def test_si_snr_matches_the_closed_form():
    """target + noise orthogonal to it at power ratio r gives exactly 10 log10(r) dB, whatever the estimate's scale
    or sign; an input-independent output (a codec that has not learned yet) scores far below 0 dB."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(3, 1, 4000, generator=generator)
    target -= target.mean(-1, keepdim=True)
    noise = torch.randn(3, 1, 4000, generator=generator)
    noise -= noise.mean(-1, keepdim=True)
    noise -= (noise * target).sum(-1, keepdim=True) / (target * target).sum(-1, keepdim=True) * target
    for ratio in (0.25, 1.0, 8.0):
        scaled = noise * ((target.pow(2).sum(-1, keepdim=True) / ratio) / noise.pow(2).sum(-1, keepdim=True)).sqrt()
        expected = torch.full((3,), 10 * math.log10(ratio))
        torch.testing.assert_close(train_codec.si_snr(target + scaled, target), expected, atol=1e-3, rtol=0)
        torch.testing.assert_close(train_codec.si_snr(-0.1 * (target + scaled), target), expected, atol=1e-3, rtol=0)
    constant = torch.sin(torch.arange(4000.0) / 7).expand(3, 1, 4000)
    assert (train_codec.si_snr(constant, target) < -20).all()


def test_published_recipe_runs_a_macro_batch_update_every_n_steps(tmp_path, capsys):
    audio = tmp_path / "audio"
    write_tones(audio)
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--audio-dir", str(audio), "--valid-fraction", "0.25", "--steps", "5"]
    report = train_codec.main(argv + ["--lambda-mmd", "1000", "--mmd-every", "2"] + TINY)
    updates = [json.loads(line) for line in (out / "mmd_log.jsonl").read_text().splitlines()]
    assert [u["step"] for u in updates] == [2, 4]
    assert all(u["batches"] == 2 and u["clips"] == 4 and np.isfinite(u["mmd"]) for u in updates)
    assert 0 < report["mmd_time_share"] < 1 and report["mmd_seconds"] > 0
    assert "MMD steps (macro-batch of 2 batches every 2 steps)" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("mmd" in r for r in records)  # the per-batch monitor
    # the MMD update has Adam moments of its own, over the encoder only; the reconstruction's are not touched by it
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    codec = train_codec.load_codec(out / "last.pt")
    encoder_params = len(list(codec.encoder.parameters()))
    assert len(state["mmd_optimizer"]["state"]) == encoder_params
    assert all(entry["step"] == 2 for entry in state["mmd_optimizer"]["state"].values())
    assert all(entry["step"] == 5 for entry in state["optimizer"]["state"].values())


def test_published_recipe_under_torchrun_takes_the_macro_batch_of_every_rank(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    audio = tmp_path / "audio"
    write_tones(audio, count=6)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "models.train_codec", "train", "--out", str(out), "--audio-dir", str(audio), "--steps", "4"]
    command += ["--valid-fraction", "0.2", "--lambda-mmd", "1000", "--mmd-every", "2", "--dist-timeout", "60", *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-6000:]
    updates = [json.loads(line) for line in (out / "mmd_log.jsonl").read_text().splitlines()]
    assert [u["step"] for u in updates] == [2, 4] and all(u["clips"] == 8 for u in updates)  # 2 ranks x 2 x 2


def test_adversarial_training_logs_its_losses_and_resumes(tmp_path):
    audio = tmp_path / "audio"
    write_tones(audio)
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--audio-dir", str(audio), "--valid-fraction", "0.25", "--adversarial"]
    argv += ["--disc-filters", "4"] + TINY
    train_codec.main(argv + ["--steps", "2"])
    state = torch.load(out / "last.pt", weights_only=False)
    assert "discriminator" in state and state["config"]["loss_weights"] == {"l1": 0.1, "mel": 2.0, "commitment": 1.0}
    report = train_codec.main(argv + ["--steps", "3"])
    assert np.isfinite(report["mel_distance"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"adv", "feat", "disc"} <= set(r) and all(np.isfinite(r[k]) for k in ("adv", "feat", "disc"))
        weighted = 0.1 * r["l1"] + 2 * r["mel"] + r["commitment"] + 4 * r["adv"] + 4 * r["feat"]
        assert r["total"] == pytest.approx(weighted, rel=1e-4, abs=1e-5)


def test_discriminator_shapes_and_hinge_losses():
    from models.discriminator import MultiScaleSTFTDiscriminator, discriminator_loss, generator_losses

    discriminator = MultiScaleSTFTDiscriminator(scales=(256, 512), filters=4)
    logits, features = discriminator(torch.randn(2, 1, 4000))
    assert len(logits) == 2 and all(t.shape[:2] == (2, 1) for t in logits) and len(features[0]) == 5
    confident = [torch.full((2, 1, 3, 3), 2.0)]
    assert float(discriminator_loss(confident, [-t for t in confident])) == 0.0  # beyond the margins
    adversarial, matching = generator_losses([-t for t in confident], features, features)
    assert float(adversarial) == pytest.approx(3.0) and float(matching) == 0.0
