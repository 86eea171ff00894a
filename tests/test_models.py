import pytest
import torch

from conftest import make_model
from gguf_writer import write_llama_gguf
from pktlib.errors import PktError
from pktlib.models import (ARCHITECTURES, MODULES, NEURON_MODULES, check_pair, load_model, reference_spec,
                           resolve_model, spec, weights_hash)


def test_spec_dimensions(tiny_model, arch):
    s = spec(tiny_model)
    cfg = tiny_model.config
    assert s.arch == arch
    assert (s.n_layers, s.hidden_size, s.intermediate_size) == (3, 64, 96)
    assert s.n_heads == 4 and s.head_dim == 16 and s.attn_size == 64
    assert s.n_kv_heads == cfg.num_key_value_heads
    assert s.vocab_size == cfg.vocab_size


def test_weight_accessors_shapes_and_identity(tiny_model):
    s = spec(tiny_model)
    sd = tiny_model.state_dict()
    for l in range(s.n_layers):
        assert s.weight(tiny_model, l, "up_proj").shape == (s.intermediate_size, s.hidden_size)
        assert s.weight(tiny_model, l, "gate_proj").shape == (s.intermediate_size, s.hidden_size)
        assert s.weight(tiny_model, l, "down_proj").shape == (s.hidden_size, s.intermediate_size)
        assert s.weight(tiny_model, l, "q_proj").shape == (s.attn_size, s.hidden_size)
        assert s.weight(tiny_model, l, "k_proj").shape == (s.kv_size, s.hidden_size)
        assert s.weight(tiny_model, l, "v_proj").shape == (s.kv_size, s.hidden_size)
        assert s.weight(tiny_model, l, "o_proj").shape == (s.hidden_size, s.attn_size)
        for name in ("up_proj", "down_proj", "v_proj", "o_proj"):
            # the accessor returns the very tensor the model computes with
            assert s.weight(tiny_model, l, name).data_ptr() == sd[s.param_name(l, name)].data_ptr()
    assert s.final_norm(tiny_model).weight.shape == (s.hidden_size,)
    assert s.unembedding(tiny_model).weight.shape == (s.vocab_size, s.hidden_size)
    assert s.embedding(tiny_model).weight.shape == (s.vocab_size, s.hidden_size)


def test_qwen2_has_qkv_bias_and_gqa(tokenizer):
    m = make_model("qwen2", tokenizer=tokenizer)
    s = spec(m)
    assert s.template.qkv_bias and s.module(m, 0, "q_proj").bias is not None
    assert s.group_size == 2


def test_v_row_grouped_query_rule(tokenizer):
    s = spec(make_model("qwen2", tokenizer=tokenizer))  # 4 heads, 2 kv heads, head_dim 16
    j = torch.arange(s.attn_size)
    rows = s.v_row(j)
    h, k = j // 16, j % 16
    assert torch.equal(rows, (h // 2) * 16 + k)
    assert rows.max() == s.kv_size - 1
    # heads 0 and 1 share kv head 0
    assert s.v_row(5) == s.v_row(16 + 5) == 5


def test_v_row_without_gqa_is_identity(tokenizer):
    s = spec(make_model("llama", tokenizer=tokenizer))
    j = torch.arange(s.attn_size)
    assert torch.equal(s.v_row(j), j)


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(PktError) as e:
        spec(GPT2Config())
    msg = str(e.value)
    assert "gpt2" in msg and all(a in msg for a in ARCHITECTURES)


def test_layer_out_of_range_names_values(tiny_model):
    with pytest.raises(IndexError, match="layer 7 out of range for a 3-layer"):
        spec(tiny_model).weight(tiny_model, 7, "up_proj")


def test_reference_specs_need_no_download():
    s = reference_spec("Qwen2.5-1.5B-Instruct")
    assert (s.n_layers, s.hidden_size, s.n_heads, s.n_kv_heads, s.head_dim) == (28, 1536, 12, 2, 128)
    with pytest.raises(PktError, match="unknown reference model"):
        reference_spec("gpt-5")


def test_load_local_directory_roundtrip(tiny_dir, tokenizer):
    model, tok = load_model(tiny_dir)
    ref = make_model("llama", tokenizer=tokenizer)
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits)
    assert tok("hello").input_ids == tokenizer("hello").input_ids
    assert weights_hash(tiny_dir) == weights_hash(tiny_dir) != "unknown"


def test_load_gguf_file(tmp_path, tokenizer):
    """A GGUF file written here with the gguf package loads with identical logits and tokens."""
    ref = make_model("llama", tokenizer=tokenizer)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, ref, tokenizer)
    model, tok = load_model(path)
    assert spec(model).n_layers == 3
    text = "Tom has 12 apples, so he has 7."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tok(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_missing_model_is_user_error(tmp_path):
    with pytest.raises(PktError, match="model not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(PktError, match="GGUF file not found"):
        load_model(tmp_path / "nope.gguf")


def test_n_parameters_matches_real_models(tiny_model):
    assert spec(tiny_model).n_parameters == sum(p.numel() for p in tiny_model.parameters())


def test_n_parameters_of_reference_models():
    # the published Llama-2 parameter counts
    assert reference_spec("Llama-2-7b-chat").n_parameters == 6_738_415_616
    assert reference_spec("Llama-2-13b-chat").n_parameters == 13_015_864_320


def test_module_table_matches_real_weights(tiny_model):
    """MODULES says which axis of each weight counts which neurons; the weights agree in every architecture."""
    s = spec(tiny_model)
    for name, role in MODULES.items():
        w = s.weight(tiny_model, 1, name)  # (out, in)
        assert w.shape[role.neuron_axis] == s.n_neurons(role.axis_kind), (s.arch, name)
        assert w.shape[role.hidden_axis] == s.hidden_size, (s.arch, name)
        assert s.module_path(1, name).split(".")[-2] == (s.template.mlp if role.block == "mlp" else s.template.attn)
        if role.neuron == "attn":  # o_proj columns are attention neurons; v_proj rows are reached through v_row
            rows = s.v_row(torch.arange(s.attn_size))
            assert int(rows.max()) + 1 == w.shape[role.neuron_axis] or name == "o_proj"
    assert all(MODULES[m].neuron for m in NEURON_MODULES) and "q_proj" not in NEURON_MODULES


def test_resolve_model_one_rule(tiny_dir, tokenizer):
    m, tok, src = resolve_model(tiny_dir)
    assert next(m.parameters()).dtype == torch.float32 and tok is not None and src == str(tiny_dir)
    m16, _, _ = resolve_model(tiny_dir, dtype="bfloat16")
    assert next(m16.parameters()).dtype == torch.bfloat16
    same, tok2, _ = resolve_model((m16, tokenizer))  # a loaded model keeps its dtype
    assert same is m16 and tok2 is tokenizer
    bare, none, src = resolve_model(m)
    assert bare is m and none is None and src == str(tiny_dir)
    with pytest.raises(PktError, match="tokenizer is needed"):
        resolve_model(m, need_tokenizer=True)
    with pytest.raises(PktError, match="got int"):
        resolve_model(3)
    with pytest.raises(PktError, match="pair, got 3 items"):
        resolve_model((m, tokenizer, tokenizer))


def test_check_pair_names_what_differs(tokenizer):
    big = make_model("llama", tokenizer=tokenizer, hidden_size=128, intermediate_size=192, n_layers=4, n_heads=8)
    small = make_model("llama", tokenizer=tokenizer, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4)
    ts, ss = check_pair(big, small, method="M", same=("head_dim",), modules=("up_proj",))
    assert (ts.n_layers, ss.n_layers) == (4, 2)
    with pytest.raises(PktError, match=r"smaller than the student \(hidden_size 64 < 128, intermediate_size 96 < 192, "
                                       r"attn_size 64 < 128\); for M"):
        check_pair(small, big, method="M")
    with pytest.raises(PktError, match="teacher head_dim 32 != student head_dim 16: both must be equal for M"):
        check_pair(make_model("llama", tokenizer=tokenizer, hidden_size=128, n_heads=4), small, method="M",
                   same=("head_dim",))
    with pytest.raises(PktError, match="n_layers 2 < 4"):
        check_pair(small, big, method="M", larger=("n_layers",))
    del big.model.layers[0].mlp.up_proj
    with pytest.raises(PktError, match="the teacher .* has no module 'up_proj'"):
        check_pair(big, small, method="M", modules=("up_proj",))

