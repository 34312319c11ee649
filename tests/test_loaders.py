"""Checkpoint loaders: HF (safetensors, sharded, .bin) and Meta (sharded) parity with transformers, GGUF (all
supported tensor types, and the real SmolLM2-135M file against transformers' own GGUF loading), and the errors
for corrupt, mismatched or unsafe checkpoints."""
import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch

from lladapter_ext.generation import generate_tokens
from lladapter_ext.loaders import (CheckpointError, load_gguf, load_hf, load_meta, load_model,
                                   permute_qk_hf_to_meta, permute_qk_meta_to_hf)
from lladapter_ext.model import LlamaConfig, LlamaForCausalLM
from conftest import DEVICES
from llama_helpers import (gguf_source_model, mistral_sentencepiece_model, save_hf, smollm2_gguf, tiny_hf_model,
                           write_tiny_gguf)

# fp32 vs fp32 with a different operation order (fused RMSNorm, our attention): a few ulps of the logits' scale
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def hf_logits(hf, x):
    with torch.no_grad():
        return hf(input_ids=x).logits


# ----------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_hf_safetensors_logits_and_greedy_match_transformers(tmp_path, gqa):
    hf = tiny_hf_model(gqa)
    save_hf(hf, tmp_path)
    model, tok = load_hf(tmp_path, tokenizer=False)
    assert model.config.rope_interleaved is False and model.config.n_kv_heads == (2 if gqa else 4)
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf_logits(hf, x), **FP32_TOL)
    # greedy continuation, token for token
    prompt = x[0, :5]
    with torch.no_grad():
        ref = hf.generate(prompt.view(1, -1), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 5:].tolist()
    assert generate_tokens(model, [prompt.tolist()], 10) == [ref]


def test_hf_sharded_index_and_tied_embeddings(tmp_path):
    hf = tiny_hf_model(True, tie=True)
    save_hf(hf, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, _ = load_model(tmp_path, tokenizer=False)
    assert model.config.tie_embeddings and model.output is None
    x = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf_logits(hf, x), **FP32_TOL)


def test_hf_pytorch_model_bin_and_bf16_target(tmp_path):
    hf = tiny_hf_model(False)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = load_hf(tmp_path, tokenizer=False)
    x = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf_logits(hf, x), **FP32_TOL)
    m16, _ = load_hf(tmp_path, dtype=torch.bfloat16, tokenizer=False)
    assert {p.dtype for n, p in m16.named_parameters() if "adapter" not in n} == {torch.bfloat16}
    assert {p.dtype for p in m16.adapter_parameters()} == {torch.float32}  # optimiser-facing tensors stay fp32
    assert torch.equal(m16.layers[0].attention.wq.weight, hf.model.layers[0].self_attn.q_proj.weight.bfloat16())


@pytest.mark.parametrize("device", DEVICES)
def test_hf_load_to_device_in_target_dtype(tmp_path, device):
    hf = tiny_hf_model(True)
    save_hf(hf, tmp_path)
    x = torch.randint(0, 96, (2, 8))
    model, _ = load_hf(tmp_path, device=device, tokenizer=False)
    assert {p.device.type for p in model.parameters()} == {torch.device(device).type}
    with torch.no_grad():
        torch.testing.assert_close(model(x.to(device)).logits.cpu(), hf_logits(hf, x), **FP32_TOL)
    m16, _ = load_hf(tmp_path, dtype=torch.bfloat16, device=device, tokenizer=False)
    assert m16.layers[1].feed_forward.w2.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = m16(x.to(device)).logits.float().cpu()
    # bf16 weights and activations (8-bit mantissa) through 3 layers: agreement to a few percent of the scale
    torch.testing.assert_close(out, hf_logits(hf, x), rtol=0.05, atol=0.1)


def test_permutations_are_inverse_and_match_rope_layouts():
    w = torch.randn(4 * 8, 16)
    assert torch.equal(permute_qk_meta_to_hf(permute_qk_hf_to_meta(w, 4), 4), w)
    # rotating HF-layout features with rotate_half == rotating the Meta-permuted features interleaved, permuted back
    from lladapter_ext import reference

    cos, sin = reference.rope_cos_sin(6, 8)
    x = torch.randn(1, 6, 4, 8)
    hf_rot, _ = reference.rope(x, x, cos, sin, interleaved=False)
    # activations are W x, so the row permutation of W permutes each head's features: apply it to x^T
    meta_x = permute_qk_hf_to_meta(x.reshape(-1, 8).T, 1).T.reshape(1, 6, 4, 8)
    meta_rot, _ = reference.rope(meta_x, meta_x, cos, sin, interleaved=True)
    back = permute_qk_meta_to_hf(meta_rot.reshape(-1, 8).T, 1).T.reshape(1, 6, 4, 8)
    torch.testing.assert_close(back, hf_rot, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- Meta
def write_meta_twin(hf, directory, n_shards=2, vocab_split=False, vocab_in_params=True):
    """Write hf's weights in Meta's layout (interleaved q/k rows, Meta names) as n_shards model-parallel shards."""
    c = hf.config
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    sd = hf.state_dict()
    full = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        full.update({
            f"layers.{i}.attention.wq.weight": permute_qk_hf_to_meta(sd[p + "self_attn.q_proj.weight"], H),
            f"layers.{i}.attention.wk.weight": permute_qk_hf_to_meta(sd[p + "self_attn.k_proj.weight"], Hkv),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    shards = [{} for _ in range(n_shards)]
    for name, t in full.items():
        if t.dim() == 1:
            parts = [t] * n_shards
        elif name == "tok_embeddings.weight":
            parts = t.chunk(n_shards, dim=0 if vocab_split else 1)
        elif name.split(".")[-2] in ("wo", "w2"):
            parts = t.chunk(n_shards, dim=1)
        else:
            parts = t.chunk(n_shards, dim=0)
        for s, part in zip(shards, parts):
            s[name] = part.clone()
    os.makedirs(directory, exist_ok=True)
    for k, s in enumerate(shards):
        torch.save(s, os.path.join(directory, f"consolidated.{k:02d}.pth"))
    # FFN width 96 from Meta's rule: int(2 * 4 * 64 / 3) = 170, * 0.5 -> 85, rounded up to a multiple of 32 -> 96
    params = dict(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=H, n_kv_heads=Hkv,
                  vocab_size=c.vocab_size if vocab_in_params else -1, multiple_of=32, ffn_dim_multiplier=0.5,
                  norm_eps=c.rms_norm_eps, rope_theta=10000.0)
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)
    return full


@pytest.mark.parametrize("vocab_split", [False, True], ids=["width-split-emb", "vocab-split-emb"])
def test_meta_two_shards_match_hf_twin(tmp_path, vocab_split):
    hf = tiny_hf_model(True)
    save_hf(hf, tmp_path / "hf")
    write_meta_twin(hf, tmp_path / "meta", vocab_split=vocab_split, vocab_in_params=not vocab_split)
    meta_model, _ = load_model(tmp_path / "meta", tokenizer=False)
    hf_model, _ = load_model(tmp_path / "hf", tokenizer=False)
    assert meta_model.config.rope_interleaved and not hf_model.config.rope_interleaved
    assert meta_model.config.ffn_dim == 96 and meta_model.config.vocab_size == 96
    x = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        a, b = meta_model(x).logits, hf_model(x).logits
    torch.testing.assert_close(a, b, **FP32_TOL)
    torch.testing.assert_close(a, hf_logits(hf, x), **FP32_TOL)


def test_meta_tokenizer_from_parent_and_vocab_mismatch(tmp_path):
    hf = tiny_hf_model(False)
    write_meta_twin(hf, tmp_path / "7B")
    shutil.copy(mistral_sentencepiece_model(), tmp_path / "tokenizer.model")
    with pytest.raises(CheckpointError, match=r"tokenizer has 32000 tokens but the model's embedding has 96 rows"):
        load_meta(tmp_path / "7B")


# ----------------------------------------------------------------------------------------- errors
def test_missing_tensor_names_file_and_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf(tiny_hf_model(False), tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor for layers\.1\.attention\.wk"
                                              r"\.weight \(checkpoint has no model\.layers\.1\.self_attn\.k_proj"):
        load_hf(tmp_path, tokenizer=False)


def test_wrong_shape_and_wrong_vocab_name_file_and_tensor(tmp_path):
    save_hf(tiny_hf_model(False), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vocab_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.embed_tokens\.weight' has shape "
                                              r"\[96, 64\], expected \[100, 64\]"):
        load_hf(tmp_path, tokenizer=False)


def test_unexpected_tensor_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf(tiny_hf_model(False), tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_hf(tmp_path, tokenizer=False)


def test_truncated_files_name_the_file(tmp_path):
    save_hf(tiny_hf_model(False), tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_hf(tmp_path / "hf", tokenizer=False)
    write_meta_twin(tiny_hf_model(False), tmp_path / "meta")
    g = tmp_path / "meta" / "consolidated.01.pth"
    data = g.read_bytes()
    g.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: cannot read checkpoint"):
        load_meta(tmp_path / "meta", tokenizer=False)


class _Payload:
    """Stands for an object whose unpickling would run code."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_file_needing_pickled_code_is_refused(tmp_path):
    hf = tiny_hf_model(False)
    hf.config.save_pretrained(tmp_path)
    sd = dict(hf.state_dict())
    sd["extra"] = _Payload()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused: this file needs pickled Python code"):
        load_hf(tmp_path, tokenizer=False)


def test_load_model_dispatch_errors_and_preset():
    model, tok = load_model("smollm2-135m", device="meta", adapter_len=5, adapter_layer=3)
    assert tok is None and model.count_trainable() == 3 * 5 * 576 + 3 * 9
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a preset"):
        load_model("/nonexistent/llama")


# ----------------------------------------------------------------------------------------- GGUF
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_gguf_tensor_types_dequantise_exactly(tmp_path, qtype):
    import gguf

    T = gguf.GGMLQuantizationType
    src = gguf_source_model()
    path = tmp_path / f"tiny-{qtype}.gguf"
    written = write_tiny_gguf(path, src, T[qtype])
    model, tok = load_gguf(path, tokenizer=False)
    assert tok is None and model.config.rope_interleaved and model.config.n_kv_heads == 2
    loaded = dict(model.named_parameters())
    gname_to_ours = {"token_embd.weight": "tok_embeddings.weight",
                     "blk.1.attn_k.weight": "layers.1.attention.wk.weight",
                     "blk.0.ffn_down.weight": "feed_forward", "output.weight": "output.weight",
                     "output_norm.weight": "norm.weight"}
    for gname, ours in gname_to_ours.items():
        if ours == "feed_forward":
            ours = "layers.0.feed_forward.w2.weight"
        raw, stored = written[gname]
        expected = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, stored))).float()
        assert torch.equal(loaded[ours].detach(), expected.reshape(loaded[ours].shape)), (qtype, gname)
    x = torch.randint(0, 48, (1, 6))
    with torch.no_grad():
        out = model(x).logits
        ref = src(x).logits
    assert torch.isfinite(out).all()
    if qtype == "F32":
        assert torch.equal(out, ref)
    elif qtype in ("F16", "BF16", "Q8_0"):
        # storage rounding of 2-D weights only: F16 11 bits, BF16 8 bits, Q8_0 ~8 bits per block
        torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_gguf_f16_to_fp16_without_fp32(tmp_path):
    import gguf

    src = gguf_source_model()
    path = tmp_path / "tiny-f16.gguf"
    write_tiny_gguf(path, src, gguf.GGMLQuantizationType.F16)
    model, _ = load_gguf(path, dtype=torch.float16, tokenizer=False)
    w = model.layers[0].attention.wq.weight
    assert w.dtype == torch.float16 and torch.equal(w, src.layers[0].attention.wq.weight.half())


def test_gguf_truncated_file_is_named(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, gguf_source_model(), gguf.GGMLQuantizationType.F32)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])
    with pytest.raises(CheckpointError, match=r"tiny\.gguf"):
        load_gguf(path, tokenizer=False)


# ----------------------------------------------------------------------------------------- real SmolLM2 GGUF
@pytest.fixture(scope="module")
def smollm2_pair():
    """(our model, our tokenizer, transformers model, transformers tokenizer) from the packaged GGUF, fp32."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = smollm2_gguf()
    d, name = os.path.dirname(path), os.path.basename(path)
    ours, tok = load_model(path, dtype=torch.float32)
    # transformers' GGUF loader parses the file once per use (config, weights, tokenizer: 9 s each here) and
    # rebuilds gguf's tensor-name table once per module (397 times, 13 s): both are pure, so the oracle is run with
    # them memoised; what it computes is unchanged
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=1)(gguf.GGUFReader))
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
        hf_tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    return ours.eval(), tok, hf, hf_tok


PROMPTS = ["The capital of France is", "def fibonacci(n):", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
           "<|im_start|>assistant\n"]


@pytest.mark.slow
def test_smollm2_gguf_logits_and_greedy_match_transformers(smollm2_pair):
    ours, tok, hf, hf_tok = smollm2_pair
    assert (ours.config.n_layers, ours.config.dim, ours.config.n_heads, ours.config.n_kv_heads) == (30, 576, 9, 3)
    assert ours.config.tie_embeddings and ours.config.rope_base == 100000.0
    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    for p_ids in ids:
        x = torch.tensor([p_ids])
        with torch.no_grad():
            a, b = ours(x).logits, hf(input_ids=x).logits
        # same dequantised weights in fp32; 30 layers of differently ordered fp32 sums on logits of scale ~30
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)
    with torch.no_grad():
        refs = [hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_id,
                            eos_token_id=None)[0, len(p):].tolist() for p in ids]
    assert generate_tokens(ours, ids, 6) == refs  # batched and left-padded, against one-by-one transformers
    assert "Paris" in tok.decode(refs[0])


TOKENIZER_STRINGS = ["Hello world", " leading space", "trailing  ", "a  b   c\n\n\tx", "héllo wörld ñ",
                     "日本語のテキスト", "emoji 🤗👍🏽 mix", "1234567 + 3.14159 = ?", "don't I'll we've",
                     "<|im_start|>user\nhi<|im_end|>", "", "   ", "\n", "tab\there", "Ünïcödé ‽ €100",
                     "x" * 50]


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_matches_transformers(smollm2_pair):
    _, tok, _, hf_tok = smollm2_pair
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    for s in TOKENIZER_STRINGS:
        ids = tok.encode(s, bos=False)
        assert ids == hf_tok(s, add_special_tokens=False).input_ids, s
        assert tok.decode(ids, skip_special=False) == s
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered == hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------- issue 20
def test_adapter_with_non_finite_tensors_is_refused_naming_tensor_and_file(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, dim=32, n_layers=2, n_heads=4, ffn_dim=64, adapter_len=3,
                                         adapter_layer=2))
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(path)
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path))
    sd["layers.1.attention.adapter_gate"][2] = float("inf")
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=f"tensor layers.1.attention.adapter_gate in {path} is not finite "
                                         r"\(0 NaN, 1 inf of 4 values\)"):
        model.load_adapter(path)
    sd["layers.1.attention.adapter_gate"][2] = 0.0
    sd["layers.0.attention.adapter_prompt"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="tensor layers.0.attention.adapter_prompt in state dict is not finite"):
        model.load_adapter(sd)


@pytest.mark.parametrize("change, fields", [
    ({"num_attention_heads": 0}, "n_heads must be a positive integer, got 0"),
    ({"head_dim": 0}, "head_dim must be a positive integer, got 0"),
    ({"num_key_value_heads": 0, "num_attention_heads": 0}, "n_heads must be a positive integer"),
    ({"hidden_size": 2}, r"dim \(2\) must be divisible by n_heads \(4\)"),
])
def test_config_with_zero_heads_or_head_dim_is_refused_naming_the_fields(tmp_path, change, fields):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 48, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, **change}))
    (tmp_path / "model.safetensors").write_bytes(b"")  # never reached
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'config.json'}: invalid model config: .*{fields}"):
        load_hf(tmp_path, tokenizer=False)
    with pytest.raises(ValueError, match="n_heads must be a positive integer, got 0 .*dim=64, n_heads=0"):
        LlamaConfig(dim=64, n_heads=0)
