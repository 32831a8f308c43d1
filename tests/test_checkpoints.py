"""Loading MusicGen decoders (models.checkpoints) against the originals' own forward on random weights, in each
released configuration's layout (small d = 1024 / 24 layers / 16 heads, medium 1536 / 48 / 24, large 2048 / 48 / 32;
K = 4, C = 2048): audiocraft 1.3.0's LMModel and transformers' MusicgenForCausalLM.

By default each size keeps its head count, K and C but runs 2 layers of 4-wide heads: the code paths (key names,
fused q/k/v rows, head split, norms, heads) are the same at every width and depth. The small model at its real width
runs with 1 layer; MMDKERNELS_FULL_CHECKPOINT_TESTS=1 adds MusicGen-small at full size (24 layers: ~60 s and
6 GB of RAM on one thread).

audiocraft is installed with `pip install --no-deps` (scripts/setup_env.sh): its LM's import chain names packages it
never calls on this path (xformers, spacy, av, librosa, flashy, omegaconf, ...), which `absent_modules_stubbed`
stands in for while importing and during each audiocraft test only (where they are not installed).
"""

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from tolerances import EPS32, assert_close_to_reference

from models.checkpoints import (
    audiocraft_condition,
    lm_config_from_audiocraft,
    lm_config_from_hf,
    load_audiocraft_musicgen,
    load_hf_musicgen,
)
from models.lm import LMConfig, MusicLM, code_log_likelihoods, teacher_forcing
from models.text_encoder import Condition

pytestmark = pytest.mark.usefixtures("single_thread")

K, CARD = 4, 2048
SIZES = {"small": (1024, 24, 16), "medium": (1536, 48, 24), "large": (2048, 48, 32)}  # dim, layers, heads
REDUCED_HEAD_DIM, REDUCED_LAYERS = 4, 2
TEXT = dict(text_dim=16, text_layers=1, text_heads=4)  # our (unused) text encoder: the condition is given directly
FULL = os.environ.get("MMDKERNELS_FULL_CHECKPOINT_TESTS") == "1"


def reduced(size: str) -> tuple[int, int, int]:
    """(dim, layers, heads) of a size at its real head count with narrow heads and few layers."""
    heads = SIZES[size][2]
    return heads * REDUCED_HEAD_DIM, REDUCED_LAYERS, heads


class _AnyAttribute(types.ModuleType):
    """A stand-in for a module audiocraft imports but never calls here: any attribute is a new empty class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = sys.modules.get(f"{self.__name__}.{name}") or type(name, (), {})
        setattr(self, name, value)
        return value


class _LowerTriangularMask:
    """xformers.ops.LowerTriangularMask: with audiocraft's 'torch' backend only its presence (causal) is read."""


@contextlib.contextmanager
def absent_modules_stubbed():
    """Stand-ins for the third-party modules audiocraft's LM imports but does not call here, only those not
    installed, and only for the duration: other code must not find them. xformers is also asked for at construction
    and in the forward of the released layout (memory_efficient=True) even with the 'torch' attention backend."""
    added = []
    for name in ("xformers", "spacy", "av", "flashy", "omegaconf", "julius", "num2words", "librosa", "transformers"):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = _AnyAttribute(name)
            added.append(name)
    if "xformers" in added:
        # the custom self-attention splits q/k/v with xformers.ops.unbind (torch.unbind's semantics)
        ops = sys.modules["xformers"].ops = sys.modules["xformers.ops"] = _AnyAttribute("xformers.ops")
        ops.unbind, ops.LowerTriangularMask, ops.memory_efficient_attention = torch.unbind, _LowerTriangularMask, None
        added.append("xformers.ops")
    for name in ("flashy.distrib", "librosa.filters"):
        if name.split(".")[0] in added:
            sys.modules[name] = _AnyAttribute(name)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


@pytest.fixture(scope="module")
def audiocraft_modules():
    """audiocraft.models.lm, .modules.conditioners and .modules.codebooks_patterns, imported without the package's
    __init__ (it imports every model and dataset)."""
    if importlib.util.find_spec("audiocraft") is None:
        pytest.skip(reason="audiocraft is not installed (scripts/setup_env.sh installs audiocraft==1.3.0 --no-deps)")
    try:
        import transformers  # noqa: F401  (the real one, if present: its import probes packages a stub would fake)
    except ImportError:
        pass
    root = Path(importlib.util.find_spec("audiocraft").origin).parent
    for package in ("audiocraft", "audiocraft.models", "audiocraft.modules", "audiocraft.data"):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
            sys.modules[package] = module
    with absent_modules_stubbed():
        lm = importlib.import_module("audiocraft.models.lm")
        conditioners = importlib.import_module("audiocraft.modules.conditioners")
        patterns = importlib.import_module("audiocraft.modules.codebooks_patterns")
    return types.SimpleNamespace(
        LMModel=lm.LMModel,
        ConditionFuser=conditioners.ConditionFuser,
        ConditioningProvider=conditioners.ConditioningProvider,
        DelayedPatternProvider=patterns.DelayedPatternProvider,
    )


@pytest.fixture
def audiocraft(audiocraft_modules):
    with absent_modules_stubbed():
        yield audiocraft_modules


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights of unit-variance outputs (embeddings std 1), LayerNorms near identity with random biases."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if p.dim() == 1:  # LayerNorm
                noise = 0.1 * noise + (1.0 if name.endswith("weight") else 0.0)
            elif "emb" not in name:
                noise = noise / p.shape[-1] ** 0.5
            p.copy_(noise)


def audiocraft_musicgen(ac, dim, layers, heads, generator, **layout):
    """An audiocraft MusicGen LMModel (musicgen_lm.yaml's transformer_lm settings) with random float64 weights.
    layout: memory_efficient (the released models: custom q/k/v, SDPA) or custom / plain nn.MultiheadAttention."""
    fuser = ac.ConditionFuser({"cross": ["description"], "sum": [], "prepend": [], "input_interpolate": []})
    settings = {"memory_efficient": True, "custom": False, **layout}
    lm = ac.LMModel(
        ac.DelayedPatternProvider(n_q=K, delays=list(range(K))),
        ac.ConditioningProvider({}),
        fuser,
        n_q=K,
        card=CARD,
        dim=dim,
        num_heads=heads,
        num_layers=layers,
        hidden_scale=4,
        norm_first=True,
        bias_proj=False,
        bias_ff=False,
        bias_attn=False,
        causal=True,
        cross_attention=True,
        activation="gelu",
        dropout=0.0,
        **settings,
    )
    randomize_(lm, generator)
    return lm.double().eval()


def padded_condition(batch, length, dim, generator, dtype=torch.float64):
    """Condition embeddings [B, Tc, D] whose row b has its last b positions padded (zeroed, as audiocraft's T5
    conditioner leaves them) and the token mask bool [B, Tc]."""
    mask = torch.arange(length)[None] < (length - torch.arange(batch))[:, None]
    embeddings = torch.randn(batch, length, dim, generator=generator, dtype=dtype) * mask[..., None]
    return embeddings, mask


def ours_from(source, dtype, loader, config: LMConfig) -> MusicLM:
    torch.manual_seed(0)
    model = MusicLM(config).to(dtype).eval()
    loader(model, source)
    return model


def assert_matches_audiocraft(lm, generator, name, batch=2, frames=5) -> float:
    """Our float32 model loaded from lm (float64; turned to float32 in place) against audiocraft's float64 forward,
    within 2x audiocraft's own float32 error (the tolerance rule), on teacher-forced inputs and a padded condition.
    Returns the max error."""
    dim = lm.dim
    codes = torch.randint(0, CARD, (batch, K, frames), generator=generator)
    inputs, _, _ = teacher_forcing(codes, "delay", CARD)
    embeddings, mask = padded_condition(batch, 3, dim, generator)
    with torch.no_grad():
        ref64 = lm(inputs, [], {"description": (embeddings, mask)})
        ours = ours_from(lm, torch.float32, load_audiocraft_musicgen, lm_config_from_audiocraft(lm, **TEXT))
        baseline = lm.float()(inputs, [], {"description": (embeddings.float(), mask)})  # in place: no third copy
        # audiocraft's cross-attention attends to the zeroed padding (no mask): the condition's mask is all True
        logits = ours(inputs, Condition(embeddings.float(), torch.ones_like(mask)))
    assert logits.shape == ref64.shape == (batch, K, inputs.shape[2], CARD)
    return assert_close_to_reference(logits, ref64, baseline, name=name)


@pytest.mark.parametrize("size", SIZES)
def test_matches_audiocraft_lm_in_each_released_layout(audiocraft, size, seeded):
    lm = audiocraft_musicgen(audiocraft, *reduced(size), seeded)
    assert_matches_audiocraft(lm, seeded, f"ours vs audiocraft MusicGen-{size} layout")


@pytest.mark.parametrize("layout", [dict(memory_efficient=False, custom=True), dict(memory_efficient=False)])
def test_matches_audiocraft_other_attention_layouts(audiocraft, layout, seeded):
    """custom=True (einsum attention, same keys) and nn.MultiheadAttention (keys ...self_attn.mha.in_proj_weight)."""
    lm = audiocraft_musicgen(audiocraft, *reduced("small"), seeded, **layout)
    assert_matches_audiocraft(lm, seeded, f"ours vs audiocraft {layout}")


def test_matches_audiocraft_at_musicgen_small_width(audiocraft, seeded):
    dim, _, heads = SIZES["small"]
    lm = audiocraft_musicgen(audiocraft, dim, 1, heads, seeded)
    assert_matches_audiocraft(lm, seeded, "ours vs audiocraft MusicGen-small width, 1 layer", batch=1, frames=3)


@pytest.mark.skipif(
    not FULL, reason="full-size MusicGen-small (60 s, 6 GB RAM): set MMDKERNELS_FULL_CHECKPOINT_TESTS=1"
)
def test_matches_audiocraft_full_musicgen_small(audiocraft, seeded):
    lm = audiocraft_musicgen(audiocraft, *SIZES["small"], seeded)
    assert_matches_audiocraft(lm, seeded, "ours vs audiocraft MusicGen-small, full size", batch=1, frames=3)


def test_code_log_likelihoods_match_audiocraft_compute_predictions(audiocraft, seeded):
    """Through both codebook patterns: audiocraft's compute_predictions (its delay pattern, logits reverted to the
    codes' frames; all T + K - 1 steps, so every code is scored) gives the log-probabilities code_log_likelihoods
    gives."""
    lm = audiocraft_musicgen(audiocraft, *reduced("small"), seeded)
    codes = torch.randint(0, CARD, (2, K, 6), generator=seeded)
    embeddings, mask = padded_condition(2, 4, lm.dim, seeded)

    def audiocraft_log_probs(model, emb):
        out = model.compute_predictions(codes, [], {"description": (emb, mask)}, keep_only_valid_steps=False)
        assert bool(out.mask.all())
        return torch.log_softmax(out.logits, dim=-1).gather(-1, codes[..., None])[..., 0]

    with torch.no_grad():
        ref64 = audiocraft_log_probs(lm, embeddings)
        ours = ours_from(lm, torch.float32, load_audiocraft_musicgen, lm_config_from_audiocraft(lm, **TEXT))
        baseline = audiocraft_log_probs(lm.float(), embeddings.float())
        log_probs = code_log_likelihoods(ours, codes, Condition(embeddings.float(), torch.ones_like(mask)))
    assert_close_to_reference(log_probs, ref64, baseline, name="log p(code) vs audiocraft")


def test_audiocraft_package_and_condition_projection(audiocraft, seeded):
    """A released-style package {"xp.cfg", "best_state"} (with the T5 conditioner's output_proj): the config comes
    from it, and audiocraft_condition projects and zeroes T5 states as audiocraft's T5Conditioner does."""
    dim, layers, heads = reduced("medium")
    lm = audiocraft_musicgen(audiocraft, dim, layers, heads, seeded)
    proj = torch.nn.Linear(8, dim).double()
    randomize_(proj, seeded)
    state = {
        **lm.state_dict(),
        **{f"condition_provider.conditioners.description.output_proj.{k}": v for k, v in proj.state_dict().items()},
    }
    # as a released package's OmegaConf YAML dump (transformer_lm.cross_attention stays false there: the builder turns
    # it on because fuser.cross is not empty)
    xp_cfg = (
        f"transformer_lm:\n  num_heads: {heads}\n  norm_first: true\n  bias_attn: false\n  cross_attention: false\n"
        "codebooks_pattern:\n  modeling: delay\n  delay:\n    delays: [0, 1, 2, 3]\n"
        "fuser:\n  cross_attention_pos_emb: false\n  sum: []\n  prepend: []\n  cross: [description]\n"
    )
    package = {"xp.cfg": xp_cfg, "best_state": state}
    config = lm_config_from_audiocraft(package, **TEXT)
    assert (config.dim, config.num_layers, config.num_heads, config.ffn_dim, config.codebook_size) == (
        dim,
        layers,
        heads,
        4 * dim,
        CARD,
    )
    t5_states = torch.randn(2, 3, 8, generator=seeded, dtype=torch.float64)
    t5_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    condition = audiocraft_condition(package, t5_states, t5_mask)
    expected = proj(t5_states) * t5_mask[..., None]
    assert bool(condition.mask.all()) and condition.embeddings.shape == (2, 3, dim)
    assert_close_to_reference(condition.embeddings, expected, name="audiocraft_condition vs output_proj * mask")
    codes = torch.randint(0, CARD, (2, K, 3), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, "delay", CARD)
    with torch.no_grad():
        ours = ours_from(package, torch.float64, load_audiocraft_musicgen, config)(inputs, condition)
        theirs = lm(inputs, [], {"description": (expected, t5_mask.bool())})
    # float64 on both sides except our sinusoids, computed in float32 (models.lm.sinusoidal_positions; with float64
    # sinusoids the two agree to 5e-15): a float32 floor
    assert_close_to_reference(ours, theirs, name="ours vs audiocraft from a package, float64", floor=8 * EPS32)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.pop("transformer.layers.1.norm2.bias"), r"no key 'transformer\.layers\.1\.norm2\.bias'"),
        (lambda s: s.pop("out_norm.weight"), "post-norm"),
        (lambda s: s.update({"transformer.layers.0.linear1.bias": torch.zeros(256)}), "bias_ff=True"),
        (lambda s: s.update({"transformer.layers.0.self_attn.in_proj_bias": torch.zeros(192)}), "bias_attn=True"),
        (lambda s: s.update({"linears.0.bias": torch.zeros(CARD)}), "bias_proj=True"),
        (lambda s: s.update({"transformer.layers.2.linear1.weight": torch.zeros(256, 64)}), "more layers"),
        (
            lambda s: s.update({"emb.0.weight": torch.zeros(CARD, 64)}),
            r"token_embedding\.weight: expected \(8196, 64\), got \(8195, 64\)",
        ),
    ],
)
def test_bad_audiocraft_state_dict_raises(edit, match):
    torch.manual_seed(0)
    config = LMConfig(num_codebooks=K, codebook_size=CARD, dim=64, num_layers=2, num_heads=16, ffn_dim=256, **TEXT)
    state = {}
    for i in range(K):
        state[f"emb.{i}.weight"] = torch.zeros(CARD + 1, 64)
        state[f"linears.{i}.weight"] = torch.zeros(CARD, 64)
    state["out_norm.weight"], state["out_norm.bias"] = torch.ones(64), torch.zeros(64)
    for i in range(2):
        p = f"transformer.layers.{i}."
        for attn in ("self_attn", "cross_attention"):
            state[f"{p}{attn}.in_proj_weight"] = torch.zeros(192, 64)
            state[f"{p}{attn}.out_proj.weight"] = torch.zeros(64, 64)
        state[p + "linear1.weight"], state[p + "linear2.weight"] = torch.zeros(256, 64), torch.zeros(64, 256)
        for norm in ("norm1", "norm_cross", "norm2"):
            state[f"{p}{norm}.weight"], state[f"{p}{norm}.bias"] = torch.ones(64), torch.zeros(64)
    load_audiocraft_musicgen(MusicLM(config), dict(state))  # the unedited dict loads
    edit(state)
    with pytest.raises(ValueError, match=match):
        load_audiocraft_musicgen(MusicLM(config), state)


def test_audiocraft_condition_with_cross_attention_positions(audiocraft, seeded):
    """fuser.cross_attention_pos_emb (off in released MusicGens): audiocraft_condition adds the fuser's sinusoids."""
    proj = torch.nn.Linear(8, 32).double()
    randomize_(proj, seeded)
    state = {f"condition_provider.conditioners.description.output_proj.{k}": v for k, v in proj.state_dict().items()}
    xp_cfg = {"fuser": {"cross_attention_pos_emb": True, "cross_attention_pos_emb_scale": 0.5, "cross": ["x"]}}
    t5_states = torch.randn(2, 5, 8, generator=seeded, dtype=torch.float64)
    t5_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    condition = audiocraft_condition({"xp.cfg": xp_cfg, "best_state": state}, t5_states, t5_mask)
    fuser = audiocraft.ConditionFuser(
        {"cross": ["description"]}, cross_attention_pos_emb=True, cross_attention_pos_emb_scale=0.5
    )
    with torch.no_grad():
        t5_conditioner_output = proj(t5_states) * t5_mask[..., None]
        _, expected = fuser(torch.zeros(2, 1, 32), {"description": (t5_conditioner_output, t5_mask)})
    assert bool(condition.mask.all())
    # both add float32 sinusoids (audiocraft's fuser computes them in float32 too), by exp(log) vs pow: a float32 floor
    assert_close_to_reference(condition.embeddings, expected, name="condition with positions", floor=8 * EPS32)


def test_audiocraft_config_reasons():
    state = {
        "emb.0.weight": torch.zeros(5, 8),
        "linears.0.weight": torch.zeros(4, 8),
        "transformer.layers.0.linear1.weight": torch.zeros(32, 8),
    }
    cfg = {
        "transformer_lm": {"norm_first": False, "bias_ff": True, "positional_embedding": "rope"},
        "fuser": {"prepend": ["self_wav"]},
    }
    with pytest.raises(ValueError, match=r"norm_first=False.*bias_ff=True.*positional_embedding='rope'.*prepend"):
        lm_config_from_audiocraft({"xp.cfg": cfg, "best_state": state})
    melody = {"fuser": {"prepend": ["self_wav", "description"], "cross": []}}  # MusicGen-melody: no cross-attention
    with pytest.raises(ValueError, match=r"prepend=\['self_wav', 'description'\].*fuser\.cross=\[\]"):
        lm_config_from_audiocraft({"xp.cfg": melody, "best_state": state})


# ---- transformers ----


def hf_musicgen(transformers, dim, layers, heads):
    hf_config = transformers.MusicgenDecoderConfig(
        vocab_size=CARD,
        num_codebooks=K,
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=4 * dim,
        max_position_embeddings=64,
        activation_function="gelu",
        pad_token_id=CARD,
        bos_token_id=CARD,
    )
    torch.manual_seed(0)
    return transformers.MusicgenForCausalLM(hf_config).double().eval()


@pytest.mark.parametrize("size", SIZES)
def test_matches_hugging_face_musicgen_in_each_released_layout(size, seeded):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hf = hf_musicgen(transformers, *reduced(size))
    randomize_(hf, seeded)
    model = ours_from(hf, torch.float64, load_hf_musicgen, lm_config_from_hf(hf.config, **TEXT))
    codes = torch.randint(0, CARD, (2, K, 5), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, "delay", CARD)
    embeddings, mask = padded_condition(2, 3, hf.config.hidden_size, seeded)
    with torch.no_grad():
        ours = model(inputs, Condition(embeddings, mask))
        theirs = hf(
            input_ids=inputs.reshape(-1, inputs.shape[2]), encoder_hidden_states=embeddings, encoder_attention_mask=mask
        ).logits  # [B * K, S, C]
    # float64 on both sides, and both take float32-computed sinusoids: only the float64 floor separates them
    assert_close_to_reference(ours, theirs.reshape(ours.shape), name=f"ours vs Hugging Face MusicGen-{size} layout")


def test_bad_hugging_face_inputs_raise():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hf = hf_musicgen(transformers, 32, 2, 4)
    config = lm_config_from_hf(hf.config, **TEXT)
    with pytest.raises(ValueError, match="more layers"):
        load_hf_musicgen(MusicLM(LMConfig(**{**config.__dict__, "num_layers": 1})), hf)
    with pytest.raises(ValueError, match=r"ffn_dim|fc1.*expected"):
        load_hf_musicgen(MusicLM(LMConfig(**{**config.__dict__, "ffn_dim": 64})), hf)
    with pytest.raises(TypeError, match="MusicgenForCausalLM"):
        load_hf_musicgen(MusicLM(config), object())
    hf.config.scale_embedding = True
    with pytest.raises(ValueError, match="scale_embedding"):
        lm_config_from_hf(hf.config)
