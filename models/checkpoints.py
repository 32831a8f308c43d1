"""Loading released MusicGen decoder weights into models.lm.MusicLM (delay pattern, same sizes)."""

from __future__ import annotations

import torch

from models.lm import MusicLM


def load_hf_musicgen(model: MusicLM, hf_model) -> None:
    """Copy a transformers MusicgenForCausalLM's decoder weights into `model` (same sizes; delay pattern).

    The text encoder is untouched: HF's causal LM takes encoder_hidden_states directly, so a comparison feeds both
    the same condition embeddings (Condition(hidden_states, mask))."""
    decoder = hf_model.model.decoder
    with torch.no_grad():
        model.token_embedding.weight.copy_(torch.cat([table.weight for table in decoder.embed_tokens]))
        for ours, theirs in zip(model.layers, decoder.layers):
            sa, ca = theirs.self_attn, theirs.encoder_attn
            ours.self_attn.qkv.weight.copy_(torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]))
            ours.self_attn.out.weight.copy_(sa.out_proj.weight)
            ours.cross_attn.q.weight.copy_(ca.q_proj.weight)
            ours.cross_attn.kv.weight.copy_(torch.cat([ca.k_proj.weight, ca.v_proj.weight]))
            ours.cross_attn.out.weight.copy_(ca.out_proj.weight)
            for name, hf_name in (
                ("self_norm", "self_attn_layer_norm"),
                ("cross_norm", "encoder_attn_layer_norm"),
                ("mlp_norm", "final_layer_norm"),
            ):
                getattr(ours, name).load_state_dict(getattr(theirs, hf_name).state_dict())
            ours.fc1.weight.copy_(theirs.fc1.weight)
            ours.fc2.weight.copy_(theirs.fc2.weight)
        model.final_norm.load_state_dict(decoder.layer_norm.state_dict())
        model.heads.copy_(torch.stack([head.weight for head in hf_model.lm_heads]))
