"""Loading released MusicGen decoder weights into models.lm.MusicLM (delay pattern, same sizes), from both ecosystems:

- Hugging Face transformers: `MusicgenForCausalLM` (or the decoder of `MusicgenForConditionalGeneration`),
  `load_hf_musicgen` and `lm_config_from_hf`.
- audiocraft: `LMModel` state dicts, as in the released `state_dict.bin` packages ({"xp.cfg", "best_state"}) of
  MusicGen small / medium / large and their fine-tunes, `load_audiocraft_musicgen` and `lm_config_from_audiocraft`.

Only the decoder is loaded. The text encoder (T5) stays outside: the caller passes the condition as a
`Condition(embeddings [B, Tc, D], mask [B, Tc])` holding what the checkpoint's cross-attention sees, i.e. after the
T5-to-D projection (audiocraft: the conditioner's `output_proj`, see `audiocraft_condition`; HF:
`enc_to_dec_proj`) and with padded positions zeroed. audiocraft's cross-attention attends to those zero rows (it is
given no mask), so its condition mask is all True; HF masks them out (mask = the tokenizer's attention mask).

    config = lm_config_from_audiocraft(package)            # torch.load("state_dict.bin")
    model = MusicLM(config).eval()
    load_audiocraft_musicgen(model, package)
    condition = audiocraft_condition(package, t5_hidden_states, t5_mask)
    logits = model(inputs, condition)                     # [B, K, S, C], as LMModel.forward
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from models.lm import LMConfig, MusicLM, sinusoidal_positions
from models.text_encoder import Condition

# MusicGen small / medium / large all use 64-dimensional heads (d = 1024 / 1536 / 2048, 16 / 24 / 32 heads): the head
# count is not in a state dict, so without a config it is d / 64
MUSICGEN_HEAD_DIM = 64

# audiocraft keys that are not the decoder's: the conditioners (T5 and its projection to D) belong to the caller
AUDIOCRAFT_CONDITIONER_PREFIX = "condition_provider."

# what an unexpected audiocraft key means: the setting MusicLM has no parameter for
_AUDIOCRAFT_HINTS = (
    (r"(in_proj_bias|out_proj\.bias)$", "bias_attn=True (MusicLM's attention projections are bias-free)"),
    (r"linear[12]\.bias$", "bias_ff=True (MusicLM's MLP is bias-free)"),
    (r"^linears\.\d+\.bias$", "bias_proj=True (MusicLM's heads are bias-free)"),
    (r"layer_scale", "layer_scale (MusicLM has no LayerScale)"),
    (r"(q|k)_layer_norm", "qk_layer_norm (MusicLM does not normalise queries and keys)"),
)


def _load_checked(model: MusicLM, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors (named as in model.state_dict()) into model after checking that every parameter of the decoder is
    given once with its shape; the text encoder is not loaded (the condition comes from the caller)."""
    if model.config.pattern != "delay" or model.depth_head is not None:
        raise ValueError(
            f"{source} checkpoints are K independent heads over the delay pattern: the model must use pattern 'delay' "
            f"and head 'independent', got pattern {model.config.pattern!r}, head {model.config.head!r}"
        )
    ours = {name: p for name, p in model.state_dict().items() if not name.startswith("text_encoder.")}
    assert set(tensors) <= set(ours), sorted(set(tensors) - set(ours))  # the loaders name only MusicLM's parameters
    missing = sorted(set(ours) - set(tensors))
    if missing:
        raise ValueError(f"{source} checkpoint gives no tensor for {len(missing)} MusicLM parameters: {missing[:8]}")
    wrong = [
        f"{name}: expected {tuple(ours[name].shape)}, got {tuple(t.shape)}"
        for name, t in tensors.items()
        if tuple(t.shape) != tuple(ours[name].shape)
    ]
    if wrong:
        raise ValueError(f"{source} checkpoint does not match the model's sizes (see lm_config_from_*): {wrong[:8]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            ours[name].copy_(tensor)


def _take(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{source} state dict has no key {key!r}")
    return state.pop(key)


def _num_indexed(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """How many consecutive indices i from 0 the keys matching `pattern` (a regex with one (\\d+) group) hold."""
    indices = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    count = 0
    while count in indices:
        count += 1
    return count


# ---- Hugging Face ----


def _hf_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """MusicgenForCausalLM, MusicgenForConditionalGeneration (its decoder) or a MusicgenForCausalLM state dict."""
    if isinstance(hf_model, Mapping):
        return dict(hf_model)
    if hasattr(hf_model, "lm_heads"):
        return hf_model.state_dict()
    if hasattr(getattr(hf_model, "decoder", None), "lm_heads"):
        return hf_model.decoder.state_dict()
    raise TypeError(
        "hf_model must be a MusicgenForCausalLM, a MusicgenForConditionalGeneration or a MusicgenForCausalLM state "
        f"dict, got {type(hf_model).__name__}"
    )


def lm_config_from_hf(hf_config, **overrides) -> LMConfig:
    """The LMConfig whose MusicLM holds a transformers MusicgenDecoderConfig's decoder (delay pattern).

    Args:
        hf_config: a MusicgenDecoderConfig, or a MusicgenConfig (its `.decoder` is used).
        **overrides: other LMConfig fields (text_dim, ...: the text encoder is not part of the checkpoint).
    Raises:
        ValueError naming every setting MusicLM cannot express (scaled embeddings, another activation, stereo).
    Example:
        model = MusicLM(lm_config_from_hf(hf.config)); load_hf_musicgen(model, hf)
    """
    config = getattr(hf_config, "decoder", hf_config)
    reasons = []
    if getattr(config, "scale_embedding", False):
        reasons.append("scale_embedding=True (MusicLM adds the positions to unscaled embeddings)")
    if getattr(config, "activation_function", "gelu") != "gelu":
        reasons.append(f"activation_function={config.activation_function!r} (MusicLM's MLP uses exact GELU)")
    if getattr(config, "audio_channels", 1) != 1:
        reasons.append("audio_channels=2 (stereo: its delay pattern delays codebook pairs, MusicLM's each codebook)")
    if reasons:
        raise ValueError("MusicLM cannot hold this MusicGen decoder: " + "; ".join(reasons))
    fields = dict(
        pattern="delay",
        num_codebooks=config.num_codebooks,
        codebook_size=config.vocab_size,
        dim=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        ffn_dim=config.ffn_dim,
    )
    return LMConfig(**{**fields, **overrides})


def load_hf_musicgen(model: MusicLM, hf_model) -> None:
    """Copy a transformers MusicGen decoder's weights into `model` (same sizes: see lm_config_from_hf).

    Args:
        model: a MusicLM with pattern "delay" and independent heads.
        hf_model: MusicgenForCausalLM, MusicgenForConditionalGeneration (its decoder) or a MusicgenForCausalLM
            state dict.
    Raises:
        ValueError naming the missing or unexpected keys, or each tensor whose shape differs from the model's.

    The text encoder is untouched: HF's causal LM takes encoder_hidden_states directly, so a comparison feeds both
    the same condition embeddings (Condition(hidden_states, mask))."""
    state = _hf_state_dict(hf_model)
    state = {k: v for k, v in state.items() if not k.endswith("embed_positions.weights")}  # sinusoids, not learned
    source = "Hugging Face MusicGen"
    prefix = "model.decoder."
    k = model.config.num_codebooks
    tensors = {
        "token_embedding.weight": torch.cat(
            [_take(state, f"{prefix}embed_tokens.{i}.weight", source) for i in range(k)]
        ),
        "heads": torch.stack([_take(state, f"lm_heads.{i}.weight", source) for i in range(k)]),
    }
    for name in ("weight", "bias"):
        tensors[f"final_norm.{name}"] = _take(state, f"{prefix}layer_norm.{name}", source)
    for i in range(model.config.num_layers):
        theirs, ours = f"{prefix}layers.{i}.", f"layers.{i}."

        def take(name: str, theirs=theirs) -> torch.Tensor:
            return _take(state, theirs + name, source)

        tensors[ours + "self_attn.qkv.weight"] = torch.cat([take(f"self_attn.{p}_proj.weight") for p in "qkv"])
        tensors[ours + "self_attn.out.weight"] = take("self_attn.out_proj.weight")
        tensors[ours + "cross_attn.q.weight"] = take("encoder_attn.q_proj.weight")
        tensors[ours + "cross_attn.kv.weight"] = torch.cat([take(f"encoder_attn.{p}_proj.weight") for p in "kv"])
        tensors[ours + "cross_attn.out.weight"] = take("encoder_attn.out_proj.weight")
        tensors[ours + "fc1.weight"] = take("fc1.weight")
        tensors[ours + "fc2.weight"] = take("fc2.weight")
        for norm, hf_norm in (
            ("self_norm", "self_attn_layer_norm"),
            ("cross_norm", "encoder_attn_layer_norm"),
            ("mlp_norm", "final_layer_norm"),
        ):
            for name in ("weight", "bias"):
                tensors[f"{ours}{norm}.{name}"] = take(f"{hf_norm}.{name}")
    if state:
        raise ValueError(
            f"{source} state dict has {len(state)} keys MusicLM has no parameter for: {sorted(state)[:8]} (more layers "
            "or codebooks than the model's config?)"
        )
    _load_checked(model, tensors, source)


# ---- audiocraft ----


def audiocraft_state_dict(source) -> dict[str, torch.Tensor]:
    """The LMModel state dict from an audiocraft LMModel, its state dict, or a released package
    {"xp.cfg": ..., "best_state": state dict} (what torch.load("state_dict.bin") returns)."""
    if isinstance(source, Mapping):
        return dict(source["best_state"] if "best_state" in source else source)
    if isinstance(source, torch.nn.Module) and hasattr(source, "linears") and hasattr(source, "emb"):
        return source.state_dict()
    raise TypeError(
        "source must be an audiocraft LMModel, its state dict or a package with 'best_state', "
        f"got {type(source).__name__}"
    )


def _audiocraft_lm_settings(source) -> dict | None:
    """transformer_lm / codebooks_pattern / fuser settings of a package's "xp.cfg" (dict or YAML text), else None."""
    if not isinstance(source, Mapping) or "xp.cfg" not in source:
        return None
    cfg = source["xp.cfg"]
    if isinstance(cfg, str):
        import yaml

        cfg = yaml.safe_load(cfg)
    return dict(cfg)


def _audiocraft_setting_reasons(cfg: dict, num_codebooks: int) -> list[str]:
    """Every setting of an audiocraft LM config that MusicLM cannot express (empty: it can)."""
    lm = cfg.get("transformer_lm", {})
    required = dict(
        norm_first=True,
        bias_attn=False,
        bias_ff=False,
        bias_proj=False,
        layer_scale=None,
        positional_embedding="sin",
        positional_scale=1.0,
        max_period=10000,
        activation="gelu",
        qk_layer_norm=False,
        qk_layer_norm_cross=False,
        kv_repeat=1,
        past_context=None,
        causal=True,
        norm="layer_norm",
    )
    reasons = [f"transformer_lm.{k}={lm[k]!r} (needs {v!r})" for k, v in required.items() if k in lm and lm[k] != v]
    pattern = cfg.get("codebooks_pattern", {})
    delays = pattern.get("delay", {}).get("delays")
    if pattern.get("modeling", "delay") != "delay" or (
        delays is not None and list(delays) != list(range(num_codebooks))
    ):
        reasons.append(
            f"codebooks_pattern {pattern.get('modeling')!r} with delays {delays} (needs 'delay', delays 0..K-1)"
        )
    for key in ("flatten_first", "empty_initial"):
        if pattern.get("delay", {}).get(key, 0):
            reasons.append(f"codebooks_pattern.delay.{key}={pattern['delay'][key]} (needs 0)")
    fuser = cfg.get("fuser", {})
    for op in ("sum", "prepend", "input_interpolate"):
        if fuser.get(op):
            reasons.append(f"fuser.{op}={list(fuser[op])} (MusicLM conditions through cross-attention only)")
    if "cross" in fuser and not fuser["cross"]:
        reasons.append("fuser.cross=[] (no cross-attention: MusicLM's layers all cross-attend)")
    return reasons


def lm_config_from_audiocraft(source, num_heads: int | None = None, **overrides) -> LMConfig:
    """The LMConfig whose MusicLM holds an audiocraft MusicGen LMModel (sizes read from the state dict's shapes).

    Args:
        source: an audiocraft LMModel, its state dict, or a released package {"xp.cfg", "best_state"}.
        num_heads: attention heads; default: the package's transformer_lm.num_heads, else d / MUSICGEN_HEAD_DIM
            (MusicGen's head size; a state dict alone does not say), else the LMModel's.
        **overrides: other LMConfig fields (text_dim, ...: the text encoder is not part of the checkpoint).
    Raises:
        ValueError naming every setting of the package's config that MusicLM cannot express (biases, post-norm,
        LayerScale, rotary positions, prepended or summed conditions, another codebook pattern, ...).
    Example:
        package = torch.load("state_dict.bin", map_location="cpu")
        model = MusicLM(lm_config_from_audiocraft(package)).eval(); load_audiocraft_musicgen(model, package)
    """
    state = audiocraft_state_dict(source)
    num_codebooks = _num_indexed(state, r"^emb\.(\d+)\.weight$")
    if num_codebooks == 0 or "linears.0.weight" not in state or "transformer.layers.0.linear1.weight" not in state:
        raise ValueError(
            "not an audiocraft LMModel state dict: no 'emb.0.weight', 'linears.0.weight' or "
            "'transformer.layers.0.linear1.weight'"
        )
    codebook_size, dim = state["linears.0.weight"].shape
    cfg = _audiocraft_lm_settings(source)
    if cfg is not None:
        reasons = _audiocraft_setting_reasons(cfg, num_codebooks)
        if reasons:
            raise ValueError("MusicLM cannot hold this audiocraft LM: " + "; ".join(reasons))
    if num_heads is None and cfg is not None:
        num_heads = cfg.get("transformer_lm", {}).get("num_heads")
    if num_heads is None and isinstance(source, torch.nn.Module):
        num_heads = source.transformer.layers[0].self_attn.num_heads
    fields = dict(
        pattern="delay",
        num_codebooks=num_codebooks,
        codebook_size=int(codebook_size),
        dim=int(dim),
        num_layers=_num_indexed(state, r"^transformer\.layers\.(\d+)\."),
        num_heads=int(num_heads) if num_heads is not None else int(dim) // MUSICGEN_HEAD_DIM,
        ffn_dim=int(state["transformer.layers.0.linear1.weight"].shape[0]),
    )
    return LMConfig(**{**fields, **overrides})


def load_audiocraft_musicgen(model: MusicLM, source) -> None:
    """Copy an audiocraft MusicGen LMModel's decoder weights into `model` (same sizes: see lm_config_from_audiocraft).

    Mapping (layer i; the fused in_proj rows are q, k, v in that order, heads contiguous within each):
        emb.{k}.weight [C + 1, D]                              -> token_embedding rows k (C + 1) ...
        transformer.layers.{i}.self_attn.in_proj_weight [3D, D] -> layers.{i}.self_attn.qkv.weight
        ...self_attn.out_proj.weight                            -> ...self_attn.out.weight
        ...cross_attention.in_proj_weight [3D, D]               -> ...cross_attn.q.weight (rows :D), .kv (rows D:)
        ...cross_attention.out_proj.weight                      -> ...cross_attn.out.weight
        ...norm1 / norm_cross / norm2                           -> ...self_norm / cross_norm / mlp_norm
        ...linear1 / linear2                                    -> ...fc1 / fc2
        out_norm, linears.{k}.weight [C, D]                     -> final_norm, heads[k]
    nn.MultiheadAttention's names (custom=False: ...self_attn.mha.in_proj_weight) are accepted too. The conditioner
    (condition_provider.*: T5's projection to D) is skipped: see audiocraft_condition.

    Args:
        model: a MusicLM with pattern "delay" and independent heads, sized as the checkpoint.
        source: an audiocraft LMModel, its state dict, or a released package {"xp.cfg", "best_state"}.
    Raises:
        ValueError naming missing keys, keys MusicLM has no parameter for (with the audiocraft setting they come
        from, e.g. bias_attn=True), or each tensor whose shape differs from the model's.
    """
    source_name = "audiocraft MusicGen"
    state = {
        re.sub(r"\.mha\.(in_proj_weight|in_proj_bias|out_proj\.)", r".\1", key): value
        for key, value in audiocraft_state_dict(source).items()
        if not key.startswith(AUDIOCRAFT_CONDITIONER_PREFIX)
    }
    k = model.config.num_codebooks
    tensors = {
        "token_embedding.weight": torch.cat([_take(state, f"emb.{i}.weight", source_name) for i in range(k)]),
        "heads": torch.stack([_take(state, f"linears.{i}.weight", source_name) for i in range(k)]),
    }
    for name in ("weight", "bias"):
        if f"out_norm.{name}" not in state:
            raise ValueError(
                f"{source_name} state dict has no 'out_norm.{name}': a post-norm LM (norm_first=False), which MusicLM "
                "(pre-norm) cannot hold"
            )
        tensors[f"final_norm.{name}"] = state.pop(f"out_norm.{name}")
    dim = model.config.dim
    for i in range(model.config.num_layers):
        theirs, ours = f"transformer.layers.{i}.", f"layers.{i}."

        def take(name: str, theirs=theirs) -> torch.Tensor:
            return _take(state, theirs + name, source_name)

        tensors[ours + "self_attn.qkv.weight"] = take("self_attn.in_proj_weight")
        tensors[ours + "self_attn.out.weight"] = take("self_attn.out_proj.weight")
        cross = take("cross_attention.in_proj_weight")
        tensors[ours + "cross_attn.q.weight"] = cross[:dim]
        tensors[ours + "cross_attn.kv.weight"] = cross[dim:]
        tensors[ours + "cross_attn.out.weight"] = take("cross_attention.out_proj.weight")
        tensors[ours + "fc1.weight"] = take("linear1.weight")
        tensors[ours + "fc2.weight"] = take("linear2.weight")
        for norm, ac_norm in (("self_norm", "norm1"), ("cross_norm", "norm_cross"), ("mlp_norm", "norm2")):
            for name in ("weight", "bias"):
                tensors[f"{ours}{norm}.{name}"] = take(f"{ac_norm}.{name}")
    if state:
        unexpected = sorted(state)
        hints = sorted({hint for key in unexpected for pattern, hint in _AUDIOCRAFT_HINTS if re.search(pattern, key)})
        raise ValueError(
            f"{source_name} state dict has {len(unexpected)} keys MusicLM has no parameter for: {unexpected[:8]}"
            + (f" (from {'; '.join(hints)})" if hints else " (more layers or codebooks than the model's config?)")
        )
    _load_checked(model, tensors, source_name)


def audiocraft_condition(
    source, hidden_states: torch.Tensor, mask: torch.Tensor, name: str = "description"
) -> Condition:
    """What an audiocraft MusicGen's cross-attention sees, from its text encoder's output (T5 not included here).

    audiocraft's T5Conditioner projects the T5 states to D (`output_proj`, with bias) and zeroes the padded
    positions; the fuser passes them to every cross-attention without a mask, so the padded (zero) rows are attended
    to. The returned Condition reproduces that: embeddings zeroed where mask is False, mask all True. Where the
    package's config sets fuser.cross_attention_pos_emb, the fuser's sinusoids (times its scale) are added too.

    Args:
        source: an audiocraft LMModel, its state dict, or a released package (holds
            condition_provider.conditioners.{name}.output_proj.{weight [D, Dt], bias [D]}).
        hidden_states: float [B, Tc, Dt], the T5 encoder's last hidden states.
        mask: bool or int [B, Tc], the tokenizer's attention mask (True / 1: a token).
        name: the conditioner's attribute ("description" for MusicGen's text).
    Returns:
        Condition(embeddings [B, Tc, D] in hidden_states' dtype, mask bool [B, Tc] all True).
    """
    state = audiocraft_state_dict(source)
    prefix = f"{AUDIOCRAFT_CONDITIONER_PREFIX}conditioners.{name}.output_proj."
    weight, bias = (_take(dict(state), prefix + p, "audiocraft MusicGen") for p in ("weight", "bias"))
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden_states must be [B, Tc, {weight.shape[1]}], got {tuple(hidden_states.shape)}")
    if tuple(mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"mask must be [B, Tc] = {tuple(hidden_states.shape[:2])}, got {tuple(mask.shape)}")
    embeddings = torch.nn.functional.linear(hidden_states, weight.to(hidden_states), bias.to(hidden_states))
    embeddings = embeddings * mask[..., None].to(embeddings.dtype)
    fuser = (_audiocraft_lm_settings(source) or {}).get("fuser", {})
    if fuser.get("cross_attention_pos_emb"):
        positions = sinusoidal_positions(torch.arange(mask.shape[1], device=embeddings.device), embeddings.shape[-1])
        embeddings = embeddings + float(fuser.get("cross_attention_pos_emb_scale", 1.0)) * positions.to(embeddings)
    return Condition(embeddings, torch.ones(mask.shape, dtype=torch.bool, device=mask.device))
