"""LM training: the loss falls on learnable codes, runs are reproducible, the CLI trains on saved code files."""

import json
import math

import pytest
import torch

from models.lm import LMConfig
from models.train_lm import learning_rate_factor, load_code_windows, load_lm, main, train_lm

TINY = dict(dim=32, num_layers=1, num_heads=2, ffn_dim=64, text_dim=16, num_codebooks=2, codebook_size=8)


pytestmark = pytest.mark.usefixtures("single_thread")


def repeating_codes(n: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """Learnable codes: each row repeats a random 2-frame motif, and codebook 1 copies codebook 0."""
    motif = torch.randint(0, 8, (n, 1, 2), generator=generator)
    first = motif.repeat(1, 1, frames // 2)
    return torch.cat([first, first], dim=1)


@pytest.mark.parametrize("pattern", ["delay", "flatten"])
def test_loss_falls_and_runs_reproduce(pattern, seeded):
    codes = repeating_codes(24, 12, seeded)
    kwargs = dict(config=LMConfig(pattern=pattern, **TINY), steps=60, batch_size=8, lr=1e-2, progress=False)
    model, log = train_lm(codes, ["motif"] * 24, valid_codes=codes[:4], valid_conditions=["motif"] * 4, **kwargs)
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.4 * losses[0]
    assert log[-1]["valid_nll_per_frame"] < 2 * 0.4 * losses[0]  # K = 2 codes per frame
    assert not model.training
    _, again = train_lm(codes, ["motif"] * 24, valid_codes=codes[:4], valid_conditions=["motif"] * 4, **kwargs)
    assert again == log


def test_cli_trains_on_saved_code_files(tmp_path, seeded):
    for name in ("piano", "drums"):
        codes = repeating_codes(1, 40, seeded)
        torch.save({"codes": codes, "num_samples": 40 * 640}, tmp_path / f"{name}.pt")
    out = tmp_path / "run"
    argv = ["--out", str(out), "--codes", str(tmp_path / "piano.pt"), str(tmp_path / "drums.pt"), "--frames", "10"]
    argv += ["--codebook-size", "8", "--steps", "3", "--batch-size", "2", "--quiet"]
    last = main(argv)
    assert "valid_nll_per_frame" in last
    model = load_lm(out / "lm.pt")
    assert model.config.codebook_size == 8 and model.config.num_codebooks == 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1] == last


def test_cli_random_codes(tmp_path):
    last = main(["--out", str(tmp_path), "--random", "6", "--frames", "5", "--codebook-size", "16", "--steps", "2"])
    assert last["valid_nll_per_frame"] > 0


def test_bad_data_raise():
    with pytest.raises(ValueError, match=r"integer tensor \[N, K, T\]"):
        train_lm(torch.zeros(4, 2), steps=1, progress=False)
    with pytest.raises(ValueError, match="conditions must hold N = 4"):
        train_lm(torch.zeros(4, 2, 3, dtype=torch.long), ["a"], steps=1, progress=False)
    with pytest.raises(ValueError, match="no window of 99 frames"):
        load_code_windows([], 99)


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [learning_rate_factor(step, 100, 10) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0) and factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # cosine: non-increasing after the warm-up
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert [learning_rate_factor(step, 50, 0) for step in (0, 25)] == pytest.approx([1.0, 0.5])


def test_cli_trains_a_depth_head(tmp_path):
    argv = ["--out", str(tmp_path), "--random", "6", "--frames", "5", "--codebook-size", "16", "--steps", "2"]
    last = main(argv + ["--head", "depth", "--quiet"])
    assert last["valid_nll_per_frame"] > 0
    assert load_lm(tmp_path / "lm.pt").config.head == "depth"
