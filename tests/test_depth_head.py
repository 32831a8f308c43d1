"""The depth head (models/depth_head.py): a joint model of a delay step that decodes consistently with teacher
forcing and captures a within-step dependence that K independent heads cannot."""

import math

import pytest
import torch

from models.generate import generate
from mmdkernels.patterns import revert_pattern
from models.lm import LMConfig, MusicLM, nll_per_frame, teacher_forcing
from models.train_lm import train_lm

C = 16
SMALL = dict(num_codebooks=3, codebook_size=C, dim=32, num_layers=1, num_heads=2, ffn_dim=64)


def test_greedy_decoding_matches_teacher_forcing():
    torch.manual_seed(0)
    model = MusicLM(LMConfig(head="depth", **SMALL)).eval()
    codes = generate(model, ["a", "b"], 0.3, top_k=0, temperature=0.0, cfg_coef=None)
    assert codes.shape == (2, 3, 15)
    # teacher forcing on the generated codes conditions codebook k on the same history and the same step's codes
    # < k: every greedy code is its argmax
    inputs, targets, _ = teacher_forcing(codes, "delay", C)
    with torch.no_grad():
        logits = model(inputs, model.encode_condition(["a", "b"]), step_codes=targets)
    assert torch.equal(revert_pattern(logits.argmax(-1), "delay", 3, 15), codes)


def test_depth_head_learns_a_within_step_dependence_the_independent_heads_cannot():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, C, (96, 3, 12), generator=generator)
    codes[:, 1, :-1] = codes[:, 0, 1:]  # one delay step holds c0[t + 1] and c1[t]: equal codes
    train, valid = codes[:80], codes[80:]
    nll = {}
    for head in ("independent", "depth"):
        config = LMConfig(head=head, **SMALL)
        model, _ = train_lm(train, config=config, steps=120, batch_size=16, lr=3e-3, warmup=10, progress=False)
        nll[head] = nll_per_frame(model, valid)
    # independent heads pay ~3 log C per frame, the depth head ~2 log C (c1 is copied from the step's c0)
    assert nll["independent"] > 2.7 * math.log(C)
    assert nll["depth"] < nll["independent"] - 0.5 * math.log(C)


def test_depth_head_is_refused_for_flatten_and_needs_step_codes():
    with pytest.raises(ValueError, match="head='depth'"):
        LMConfig(head="depth", pattern="flatten")
    with pytest.raises(ValueError, match="head must be"):
        LMConfig(head="shared")
    model = MusicLM(LMConfig(head="depth", **SMALL))
    with pytest.raises(ValueError, match="step_codes"):
        model(torch.full((1, 3, 4), C), model.encode_condition([None]))
