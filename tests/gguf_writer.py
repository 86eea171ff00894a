"""Write a tiny Llama or Qwen2 as a GGUF file with the ``gguf`` package (for the loading and conversion tests).

Follows llama.cpp's conventions: tensor names ``blk.N.attn_q`` etc., q/k rows permuted the
way its converter does (transformers undoes that permutation when it loads the file), and a
byte-level BPE ("gpt2") tokenizer stored as tokens + merges.
"""
from __future__ import annotations

import json

import numpy as np
import torch


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, model, tokenizer) -> None:
    """A Llama GGUF file (float32 tensors, q/k rows permuted as llama.cpp does)."""
    _write_gguf(path, "llama", model, tokenizer, permute_qk=True)


def write_qwen2_gguf(path, model, tokenizer, *, chat_template: str | None = None, quantise: bool = True) -> None:
    """A Qwen2 GGUF file: q/k/v biases, no q/k permutation (llama.cpp permutes only Llama).

    With ``quantise`` the 2-D layer weights are stored as Q8_0 blocks (the rest float32), so
    loading the file really dequantises; ``chat_template`` goes to ``tokenizer.chat_template``.
    """
    _write_gguf(path, "qwen2", model, tokenizer, permute_qk=False, chat_template=chat_template,
                quant="Q8_0" if quantise else None, pre="qwen2")


def _write_gguf(path, arch: str, model, tokenizer, *, permute_qk: bool, chat_template: str | None = None,
                quant: str | None = None, pre: str = "default") -> None:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-test-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    if quant:
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)

    tok = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def add(name: str, t: torch.Tensor) -> None:
        a = t.numpy().astype(np.float32)
        if quant and a.ndim == 2 and a.shape[-1] % 32 == 0:
            qtype = getattr(gguf.GGMLQuantizationType, quant)
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_shape=gguf.quant_shape_to_byte_shape(a.shape, qtype),
                         raw_dtype=qtype)
        else:
            w.add_tensor(name, a)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for l in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{l}.{hf}.weight"]
            if permute_qk and gg == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif permute_qk and gg == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            add(f"blk.{l}.{gg}.weight", t)
            bias = sd.get(f"model.layers.{l}.{hf}.bias")
            if bias is not None:
                add(f"blk.{l}.{gg}.bias", bias)
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
