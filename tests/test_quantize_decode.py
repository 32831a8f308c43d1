"""models.lm.quantize_for_decode: the decode path in bf16 / int8 weights against its spec (the same model with the
dequantised weights, float64), the fused C++ step and the per-layer path alike; training keeps the float32 masters;
a stale packed copy and a bad precision name raise."""

import copy

import pytest
import torch
from tolerances import assert_close_to_reference

from mmdkernels import QuantizedLinearWeight, _ext
from mmdkernels.patterns import PATTERNS
from models.lm import (
    Linear,
    LMConfig,
    MusicLM,
    decode_weight_bytes,
    nll_per_frame,
    quantize_for_decode,
    teacher_forcing,
)

pytestmark = pytest.mark.usefixtures("single_thread")
needs_cpu_kernels = pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ extension is not built")


def tiny_model(pattern: str = "delay") -> MusicLM:
    torch.manual_seed(0)
    config = LMConfig(
        pattern=pattern, num_codebooks=3, codebook_size=17, dim=32, num_layers=2, num_heads=4, ffn_dim=48, text_dim=16
    )
    return MusicLM(config).eval()


def dequantized_copy(model: MusicLM, dtype: torch.dtype) -> MusicLM:
    """The spec of a quantized model: a float model whose weights are the packed copies' dequantize(), exactly."""
    spec = copy.deepcopy(model)
    with torch.no_grad():
        for module in spec.modules():
            if isinstance(module, Linear) and module.decode_weight is not None:
                module.weight.copy_(module.decode_weight.packed.dequantize(torch.float64))
                module.decode_weight = None
        if spec.decode_heads is not None:
            spec.heads.copy_(spec.decode_heads.packed.dequantize(torch.float64).view(spec.heads.shape))
            spec.decode_heads = None
    return spec.to(dtype)


def decode_all(model: MusicLM, inputs: torch.Tensor, prompts) -> torch.Tensor:
    with torch.no_grad():
        cache = model.new_cache(model.encode_condition(prompts), inputs.shape[2] + 1)
        return torch.stack([model.decode_step(inputs[:, :, s], s, cache) for s in range(inputs.shape[2])], 2)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_cpu_kernels), False])
@pytest.mark.parametrize("batch", [1, 3])
def test_quantized_decode_matches_the_dequantized_spec(precision, pattern, fused, batch, seeded, monkeypatch):
    """The rule of tests/tolerances.py: the quantized decode steps against the same model with the dequantized
    weights in float64 (not against the float32 weights), the same dequantized model in float32 as the baseline."""
    if not fused:
        monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_LAYERS", "reference")
    model = quantize_for_decode(tiny_model(pattern), precision)
    codes = torch.randint(0, 17, (batch, 3, 6), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, pattern, model.config.special)
    prompts = ["a prompt", None, "another, longer prompt"][:batch]
    with torch.no_grad():
        x = model._embed(inputs[:, :, :1], torch.tensor([0]))
        assert (model._fused_decode_layers(x, model.new_cache(model.encode_condition(prompts), 2)) is not None) == fused
    logits = decode_all(model, inputs, prompts)
    spec64 = decode_all(dequantized_copy(model, torch.float64), inputs, prompts)
    baseline = decode_all(dequantized_copy(model, torch.float32), inputs, prompts)
    assert_close_to_reference(logits, spec64, baseline, name=f"{precision} {pattern} decode logits")
    with torch.no_grad():  # teacher-forced scoring uses the packed weights too
        full = model(inputs, model.encode_condition(prompts))
        models = {dtype: dequantized_copy(model, dtype) for dtype in (torch.float64, torch.float32)}
        full64, base_full = (m(inputs, m.encode_condition(prompts)) for m in models.values())
    assert_close_to_reference(full, full64, base_full, name=f"{precision} {pattern} teacher-forced logits")


def test_training_uses_the_float32_masters_and_fp32_restores(seeded):
    model = tiny_model()
    plain = copy.deepcopy(model)
    codes = torch.randint(0, 17, (2, 3, 5), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, "delay", model.config.special)
    before = decode_all(model, inputs, ["a", None])
    quantize_for_decode(model, "int8")
    assert model.decode_precision == "int8"
    assert not torch.equal(decode_all(model, inputs, ["a", None]), before)
    outputs = []
    for m in (model.train(), plain.train()):  # training mode: the same float32 path in both (same seed: dropout)
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(m(inputs, m.encode_condition(["a", None])))
    assert torch.equal(*outputs)
    quantize_for_decode(model.eval(), "fp32")
    assert torch.equal(decode_all(model, inputs, ["a", None]), before)  # the same float32 path as before


def test_a_stale_packed_copy_raises():
    model = quantize_for_decode(tiny_model(), "bf16")
    with torch.no_grad():
        model.layers[0].fc1.weight.mul_(2)  # e.g. an optimizer step after quantizing
    tokens = torch.full((1, 3), model.config.special)
    cache = model.new_cache(model.encode_condition([None]), 2)
    with pytest.raises(RuntimeError, match=r"changed since quantize_for_decode packed it: call quantize_for_decode"):
        with torch.no_grad():
            model.decode_step(tokens, 0, cache)
    quantize_for_decode(model, "bf16")
    with torch.no_grad():
        model.decode_step(tokens, 0, cache)


def test_bytes_and_packed_types():
    model = tiny_model()
    fp32 = decode_weight_bytes(model)
    assert fp32 == 4 * (2 * (3 * 32 * 32 + 3 * 32 * 32 + 2 * 32 * 48) + 3 * 17 * 32)
    quantize_for_decode(model, "bf16")
    assert decode_weight_bytes(model) == fp32 // 2
    quantize_for_decode(model, "int8")
    assert isinstance(model.layers[1].fc2.inference_weight(), QuantizedLinearWeight)
    assert model.head_weight(2).shape == (17, 32)
    rows = 2 * (3 * 32 + 32 + 32 + 32 + 48 + 32) + 3 * 17
    assert decode_weight_bytes(model) == fp32 // 4 + 4 * rows


def test_nll_per_frame_of_a_quantized_model_is_close(seeded):
    model = tiny_model()
    codes = torch.randint(0, 17, (3, 3, 6), generator=seeded)
    reference = nll_per_frame(model, codes)
    for precision in ("bf16", "int8"):
        assert abs(nll_per_frame(quantize_for_decode(model, precision), codes) - reference) < 1e-2 * reference


def test_bad_arguments_name_them():
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'fp16', 'int8'\), got 'int4'"):
        quantize_for_decode(tiny_model(), "int4")
    with pytest.raises(TypeError, match="model must be a MusicLM"):
        quantize_for_decode(torch.nn.Linear(2, 2), "bf16")


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_profile_takes_the_weight_precision(weights, capsys):
    from models.generate import main

    main(["profile", "--seconds", "0.1", "--device", "cpu", "--weights", weights])
    printed = capsys.readouterr().out
    assert f"weights: {weights}" in printed and "weight_mib_per_step" in printed
    with pytest.raises(SystemExit):
        main(["profile", "--weights", "int4"])
    assert "argument --weights: invalid choice: 'int4'" in capsys.readouterr().err
