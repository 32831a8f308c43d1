"""The MusicGen-style LM: KV-cached decoding equals the teacher-forced forward (float64), conditioning, training
loss, per-frame NLL comparable across patterns, and equality with Hugging Face's MusicgenForCausalLM."""

import copy
import math

import pytest
import torch
from tolerances import assert_close_to_reference

import mmdkernels
import models.lm as lm_module
from mmdkernels import _ext
from mmdkernels.patterns import PATTERNS
from models.checkpoints import load_hf_musicgen
from models.lm import (
    DecoderLayer,
    LMConfig,
    MusicLM,
    code_log_likelihoods,
    lm_loss,
    nll_per_frame,
    quantize_for_decode,
    sinusoidal_positions,
    teacher_forcing,
)
from models.text_encoder import Condition


def assert_close64(actual, expected, name: str) -> None:
    """Two float64 computations of the same values (other shapes, another order): the float64 floor of the rule."""
    assert all(t.dtype == torch.float64 for t in (actual, expected) if isinstance(t, torch.Tensor))
    actual, expected = (torch.as_tensor(t, dtype=torch.float64) for t in (actual, expected))  # Python floats
    assert_close_to_reference(actual, expected, name=name)


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(pattern: str, dtype=torch.float64, **overrides) -> MusicLM:
    torch.manual_seed(0)
    config = LMConfig(
        pattern=pattern, num_codebooks=3, codebook_size=17, dim=32, num_layers=2, num_heads=4, ffn_dim=48, text_dim=16
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return MusicLM(config).to(dtype).eval()


# the decode path's kernels as the dispatcher's environment forces them: automatic, then the per-layer path with
# each float64-capable decode attention provider (the float32 kernels: test_fused_cpu_decode_step_...)
DECODE_PATHS = {
    "auto": {},
    "layers-sdpa": {"MMDKERNELS_BACKEND_DECODE_LAYERS": "reference", "MMDKERNELS_BACKEND_DECODE_ATTENTION": "sdpa"},
    "layers-reference": {
        "MMDKERNELS_BACKEND_DECODE_LAYERS": "reference",
        "MMDKERNELS_BACKEND_DECODE_ATTENTION": "reference",
    },
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("path", DECODE_PATHS)
@pytest.mark.parametrize("step_kind", ["int", "tensor"])
def test_incremental_decode_equals_full_forward(pattern, path, step_kind, seeded, monkeypatch):
    for name, value in DECODE_PATHS[path].items():
        monkeypatch.setenv(name, value)
    model = tiny_model(pattern)
    codes = torch.randint(0, 17, (2, 3, 6), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, pattern, model.config.special)
    condition = model.encode_condition(["a prompt", None])
    full = model(inputs, condition)
    cache = model.new_cache(condition, inputs.shape[2] + 3)  # longer than needed: the tail must stay unread
    steps = []
    for s in range(inputs.shape[2]):
        step = s if step_kind == "int" else torch.tensor([s])
        steps.append(model.decode_step(inputs[:, :, s], step, cache))
    assert_close64(torch.stack(steps, dim=2), full, f"{path} decode steps vs full forward")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_in_chunks_equals_full_forward(pattern, seeded):
    model = tiny_model(pattern)
    codes = torch.randint(0, 17, (3, 3, 5), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, pattern, model.config.special)
    condition = model.encode_condition(["x", "yy", "zzz"])
    full = model(inputs, condition)
    cache = model.new_cache(condition, inputs.shape[2])
    cut = inputs.shape[2] // 2
    parts = [model(inputs[:, :, :cut], condition, cache, 0), model(inputs[:, :, cut:], condition, cache, cut)]
    assert_close64(torch.cat(parts, dim=2), full, "chunked prefill vs full forward")


def test_logits_are_causal(seeded):
    model = tiny_model("delay")
    codes = torch.randint(0, 17, (1, 3, 8), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, "delay", model.config.special)
    condition = model.encode_condition(["p"])
    changed = inputs.clone()
    changed[:, :, 5] = (changed[:, :, 5] + 1) % 17
    a, b = model(inputs, condition), model(changed, condition)
    assert torch.equal(a[:, :, :5], b[:, :, :5])  # the same code path on the same shapes: bit for bit
    assert (a[:, :, 5:] - b[:, :, 5:]).abs().max() > 1e-6


def test_condition_is_used_and_batch_independent(seeded):
    model = tiny_model("delay")
    codes = torch.randint(0, 17, (1, 3, 4), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, "delay", model.config.special)
    alone = model(inputs, model.encode_condition(["short"]))
    padded = model(inputs.expand(2, -1, -1), model.encode_condition(["short", "a much longer prompt string"]))
    assert_close64(padded[:1], alone, "row 0 of a padded batch vs alone")  # padding of row 1 does not leak
    assert (padded[0] - padded[1]).abs().max() > 1e-6
    null = model(inputs, model.encode_condition([None]))
    assert (null - alone).abs().max() > 1e-6


@pytest.mark.parametrize("pattern", ["delay", "flatten"])
def test_training_loss_decreases_on_a_tiny_overfit_task(pattern, seeded):
    model = tiny_model(pattern, dtype=torch.float32).train()
    codes = torch.randint(0, 17, (4, 3, 8), generator=seeded)
    prompts = ["one", "two", "three", "four"]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = lm_loss(model, codes, model.encode_condition(prompts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(17), rel=0.05)  # small init: close to uniform
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_nll_per_frame_of_a_uniform_model_is_k_log_c(pattern, seeded):
    model = tiny_model(pattern)
    with torch.no_grad():
        model.heads.zero_()
    codes = torch.randint(0, 17, (3, 3, 7), generator=seeded)
    assert_close64(nll_per_frame(model, codes, pattern=pattern), 3 * math.log(17), "NLL of the uniform model")


def test_nll_per_frame_counts_every_code_once_for_both_patterns(seeded):
    codes = torch.randint(0, 17, (5, 3, 6), generator=seeded)
    prompts = ["a", None, "c", "d", None]
    for pattern in ("delay", "flatten"):
        model = tiny_model(pattern)
        with torch.no_grad():
            log_probs = code_log_likelihoods(model, codes, model.encode_condition(prompts))
        assert log_probs.shape == codes.shape and bool((log_probs < 0).all())
        nll = nll_per_frame(model, codes, prompts, batch_size=2)  # batches of 2, 2, 1 rows
        assert_close64(nll, -float(log_probs.sum()) / (5 * 6), f"{pattern}: NLL in batches vs summed log-probs")
        with torch.no_grad():
            loss = lm_loss(model, codes, model.encode_condition(prompts))
        assert_close64(nll, 3 * float(loss), f"{pattern}: NLL vs 3 x the training loss")


def test_same_parameter_count_for_delay_and_flatten():
    delay = sum(p.numel() for p in tiny_model("delay").parameters())
    flatten = sum(p.numel() for p in tiny_model("flatten").parameters())
    assert flatten - delay == 3 * 32  # only the codebook-position embedding [K, D]


def test_musicgen_small_preset_sizes():
    config = LMConfig.preset("musicgen-small")
    assert (config.dim, config.num_layers, config.num_heads, config.num_codebooks, config.codebook_size) == (
        1024,
        24,
        16,
        4,
        2048,
    )


def test_matches_hugging_face_musicgen_decoder(seeded):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hf_config = transformers.MusicgenDecoderConfig(
        vocab_size=17,
        num_codebooks=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=48,
        max_position_embeddings=64,
        activation_function="gelu",
        pad_token_id=17,
        bos_token_id=17,
    )
    hf = transformers.MusicgenForCausalLM(hf_config).double().eval()
    model = tiny_model("delay")
    load_hf_musicgen(model, hf)
    codes = torch.randint(0, 17, (2, 3, 5), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, "delay", 17)
    condition = model.encode_condition(["hello", None])
    embeddings = condition.embeddings.detach()
    ours = model(inputs, condition._replace(embeddings=embeddings))
    with torch.no_grad():
        theirs = hf(
            input_ids=inputs.reshape(-1, inputs.shape[2]),
            encoder_hidden_states=embeddings,
            encoder_attention_mask=condition.mask.long(),
        ).logits  # [B * K, S, C]
    assert_close64(ours, theirs.reshape(ours.shape), "ours vs Hugging Face's MusicGen decoder")


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: LMConfig(pattern="zigzag"), ValueError, "pattern must be one of"),
        (lambda: LMConfig(dim=30, num_heads=4), ValueError, "multiple of num_heads"),
        (lambda: LMConfig.preset("huge"), ValueError, "preset must be one of"),
    ],
)
def test_bad_config_raises(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_codes_raise(seeded):
    model = tiny_model("delay")
    with pytest.raises(ValueError, match=r"\[B, K=3, T\]"):
        nll_per_frame(model, torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"in \[0, C = 17\)"):
        nll_per_frame(model, torch.full((2, 3, 5), 17))
    with pytest.raises(ValueError, match="does not match the model's pattern"):
        nll_per_frame(model, torch.zeros(2, 3, 5, dtype=torch.long), pattern="flatten")
    with pytest.raises(ValueError, match="conditions must hold B = 2"):
        nll_per_frame(model, torch.zeros(2, 3, 5, dtype=torch.long), ["a"])


@pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ extension is not built")
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_cpu_decode_step_equals_the_python_layers(pattern, batch, seeded):
    """The fused CPU decode steps against the Python layers and the full forward: mmdkernels.decode_logits (tokens to
    logits in one C++ call) and mmdkernels.decode_layers (the layers in one call, forced by
    MMDKERNELS_BACKEND_DECODE_LOGITS=reference)."""
    model = tiny_model(pattern, dtype=torch.float32)
    model64 = copy.deepcopy(model).double()  # the same weights: the float64 reference
    codes = torch.randint(0, 17, (batch, 3, 7), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, pattern, model.config.special)
    prompts = ["a prompt", None, "another, longer prompt"][:batch]
    modes = {
        "step": {},
        "layers": {"MMDKERNELS_BACKEND_DECODE_LOGITS": "reference"},
        "python": {"MMDKERNELS_BACKEND_DECODE_LAYERS": "reference"},
    }
    with torch.no_grad():
        runs = {}
        for mode, variables in modes.items():
            with pytest.MonkeyPatch.context() as env:
                for name, value in variables.items():
                    env.setenv(name, value)
                cache = model.new_cache(model.encode_condition(prompts), inputs.shape[2] + 2)
                x = model._embed(inputs[:, :, :1], torch.tensor([0]))
                assert (model._fused_decode_layers(x, cache) is not None) == (mode != "python")
                fused_step = model._fused_decode_step(inputs[:, :, 0], 0, copy.deepcopy(cache))
                assert (fused_step is not None) == (mode == "step")
                steps = [model.decode_step(inputs[:, :, s], s, cache) for s in range(inputs.shape[2])]
            runs[mode] = torch.stack(steps, 2)
            runs[mode, "cache"] = cache.self_k.clone()
        cache64 = model64.new_cache(model64.encode_condition(prompts), inputs.shape[2] + 2)
        runs64 = torch.stack([model64.decode_step(inputs[:, :, s], s, cache64) for s in range(inputs.shape[2])], 2)
        full64 = model64(inputs, model64.encode_condition(prompts))
    assert_close64(runs64, full64, "float64 decode steps vs full forward")
    # the rule: the fused C++ steps against float64, with the Python layers in float32 (PyTorch's own computation of
    # the same steps) as the baseline; the caches likewise
    for mode in ("step", "layers"):
        assert_close_to_reference(runs[mode], runs64, runs["python"], name=f"fused decode logits ({mode})")
        assert_close_to_reference(
            runs[mode, "cache"], cache64.self_k, runs["python", "cache"], name=f"fused decode K cache ({mode})"
        )


@pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ extension is not built")
def test_fused_decode_only_where_it_can_run(seeded):
    model = tiny_model("delay", dtype=torch.float32)
    condition = model.encode_condition(["a prompt", None])
    x = torch.zeros(2, 1, 32)
    with torch.no_grad():
        cache = model.new_cache(condition, 4)
        assert model._fused_decode_layers(x, cache) is not None
        assert model._fused_decode_layers(x.double(), cache) is None
        assert model._fused_decode_layers(torch.zeros(17, 1, 32), cache) is None
        holes = Condition(condition.embeddings, torch.tensor([[True, False, True], [True, True, True]]))
        holes_cache = model.new_cache(holes, 4)
        assert holes_cache.cross_lengths is None  # not a prefix mask: SDPA with the mask
        assert model._fused_decode_layers(x, holes_cache) is None
        model.train()
        assert model._fused_decode_layers(x, cache) is None
        model.eval()
    assert model._fused_decode_layers(x, cache) is None  # autograd recording


@pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ extension is not built")
def test_whole_step_in_one_call_only_where_it_can_run(seeded):
    """MusicLM._fused_decode_step (mmdkernels.decode_logits) takes a step only where the one-call step computes what
    the model does; else the step runs in parts (and still answers)."""
    model = tiny_model("delay", dtype=torch.float32)
    condition = model.encode_condition(["a prompt", None])
    tokens = torch.full((2, 3), model.config.special)
    with torch.no_grad():
        cache = model.new_cache(condition, 4)
        assert model._fused_decode_step(tokens, 0, cache) is not None
        assert model._fused_decode_step(torch.zeros(17, 3, dtype=torch.long), 0, model.new_cache(condition, 4)) is None
        holes = Condition(condition.embeddings, torch.tensor([[True, False, True], [True, True, True]]))
        assert model._fused_decode_step(tokens, 0, model.new_cache(holes, 4)) is None
        model.final_norm.eps = 1e-6  # one epsilon for every norm in the op
        assert model._fused_decode_step(tokens, 1, cache) is None
        model.final_norm.eps = model.layers[0].self_norm.eps
        with pytest.raises(RuntimeError, match=r"tokens\[0, 2\] \+ offsets\[2\] = 54 is outside the embedding"):
            model._fused_decode_step(torch.full((2, 3), 18), 1, cache)  # the last table's row 18: past its end
        model.train()
        assert model._fused_decode_step(tokens, 1, cache) is None
        model.eval()
        assert model._fused_decode_step(tokens, 1, cache) is not None
        flatten = tiny_model("flatten", dtype=torch.float32)
        assert flatten._fused_decode_step(tokens[:, :1], 0, flatten.new_cache(condition, 4)) is not None
        depth = tiny_model("delay", dtype=torch.float32, head="depth")  # the heads read more than the state
        assert depth._fused_decode_step(tokens, 0, depth.new_cache(condition, 4)) is None
        assert tiny_model("delay", dtype=torch.float64)._fused_decode_step(tokens, 0, cache) is None
    assert model._fused_decode_step(tokens, 2, cache) is None  # autograd recording


@pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ extension is not built")
def test_prepared_decode_layers_follow_every_change_of_the_weights(seeded):
    """The fused step's preparation is cached (MusicLM.prepared_decode_layers, the same object step after step) but
    never streams stale weights: after an in-place change, a replaced parameter, a replaced layer, quantize_for_decode
    and .to(), the fused step equals the Python layers' step on the model as it is now (and differs from before the
    change); a packed copy whose parameter changed in place raises."""
    model = tiny_model("delay", dtype=torch.float32)
    tokens = torch.randint(0, 17, (2, 3), generator=seeded)
    condition = model.encode_condition(["a prompt", None])

    def step(fused: bool) -> torch.Tensor:
        with pytest.MonkeyPatch.context() as env, torch.no_grad():
            if not fused:
                env.setenv("MMDKERNELS_BACKEND_DECODE_LAYERS", "reference")
            cache = model.new_cache(Condition(condition.embeddings.to(model.heads.dtype), condition.mask), 4)
            model.decode_step(tokens, 0, cache)
            return model.decode_step(tokens, 1, cache)

    before = [step(True)]

    def check(change: str, tolerance: float = 1e-4) -> None:
        fused, layers = step(True), step(False)
        scale = layers.abs().max()
        assert (fused - layers).abs().max() <= tolerance * scale, f"{change}: the fused step streams stale weights"
        assert (fused - before[0]).abs().max() >= 1e-2 * scale, f"{change}: the change did not reach the output"
        before[0] = fused

    prepared = model.prepared_decode_layers()
    assert model.prepared_decode_layers() is prepared
    with torch.no_grad():
        model.layers[0].fc1.weight.mul_(3)
    check("in-place change")
    assert model.prepared_decode_layers() is prepared  # the preparation holds the parameters themselves
    qkv = model.layers[1].self_attn.qkv
    qkv.weight = torch.nn.Parameter(0.2 * torch.randn_like(qkv.weight))
    check("replaced parameter")
    layer = DecoderLayer(model.config)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2, generator=seeded)
    model.layers[0] = layer.eval()
    check("replaced layer")
    with torch.no_grad():
        model.layers[1].fc2.weight.mul_(-2)
    quantize_for_decode(model, "int8")
    check("quantize_for_decode", tolerance=1e-3)  # both paths stream the same int8 copies
    with torch.no_grad():
        model.layers[1].fc2.weight.mul_(2)
    with pytest.raises(RuntimeError, match="changed since quantize_for_decode"):
        step(True)
    quantize_for_decode(model, "fp32")
    model.double()
    with torch.no_grad():
        assert model._fused_decode_layers(torch.zeros(2, 1, 32, dtype=torch.float64), model.new_cache(
            Condition(condition.embeddings.double(), condition.mask), 4)) is None  # fmt: skip
    before[0] = step(False).float()
    with torch.no_grad():
        model.layers[0].fc2.weight.mul_(-1)
    model.float()
    check(".double(), a change, then .float()")


@pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ extension is not built")
def test_decode_step_takes_the_fused_path_only_for_int_steps(seeded, monkeypatch):
    """The CUDA-graph variant (a tensor step) never calls decode_logits or decode_layers: it runs the layers under a
    length mask. An int step calls decode_logits (delay model), or decode_layers when that is forced to run."""
    model = tiny_model("delay", dtype=torch.float32)
    calls = []
    for name in ("decode_layers", "decode_logits"):
        original = getattr(mmdkernels, name)
        monkeypatch.setattr(mmdkernels, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    tokens = torch.full((2, 3), model.config.special)
    with torch.no_grad():
        cache = model.new_cache(model.encode_condition(["a prompt", None]), 4)
        model.decode_step(tokens, torch.tensor([0]), cache)
        assert calls == []
        model.decode_step(tokens, 1, cache)
        assert calls == ["decode_logits"]
        monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_LOGITS", "reference")
        model.decode_step(tokens, 2, cache)
        assert calls == ["decode_logits", "decode_layers"]


@pytest.mark.parametrize("dim", [6, 64, 512, 1536])
def test_decode_positions_from_the_cached_table_equal_the_formula(dim, monkeypatch):
    """A single CPU position is read from a cached block of rows; it must equal the formula bit for bit at the edges
    of the blocks, after a jump back, inside and outside inference mode."""
    monkeypatch.setattr(lm_module, "_SINUSOID_BLOCKS", {})
    for position in (0, 1, 1023, 1024, 1025, 2047, 2048, 70000, 5000, 4095, 3):
        direct = lm_module._sinusoids(torch.tensor([position]), dim)
        assert torch.equal(sinusoidal_positions(torch.tensor([position]), dim), direct)
        with torch.inference_mode():
            assert torch.equal(sinusoidal_positions(torch.tensor([position]), dim), direct)
        first, block = lm_module._SINUSOID_BLOCKS[dim]
        assert first == position - position % 1024 and block.shape == (1024, dim)
    many = torch.arange(3, 40)  # several positions go through the formula: the same rows
    assert torch.equal(torch.cat([sinusoidal_positions(p[None], dim) for p in many]), sinusoidal_positions(many, dim))
    # and the formula is the textbook one (float64, angles p / 10000^(i / (half - 1)))
    half = dim // 2
    angles = many.double()[:, None] / 10000.0 ** (torch.arange(half, dtype=torch.float64) / (half - 1))
    expected = torch.cat([angles.cos(), angles.sin()], dim=1)
    torch.testing.assert_close(sinusoidal_positions(many, dim).double(), expected, rtol=0, atol=1e-5)
