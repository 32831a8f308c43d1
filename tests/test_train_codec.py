"""The codec training entry point end to end on tiny data: train, log, checkpoint, resume, evaluate, encode/decode."""

import json

import numpy as np
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
