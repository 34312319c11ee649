"""Property-based fuzzing of the checkpoint readers (hypothesis): truncated, bit-flipped and header-patched
safetensors files (a model in Hugging Face layout, an adapter) and GGUF files (the head of SmolLM2's). Each load must
either succeed with finite adapter tensors of the right shapes, or fail with an error of ours that names the file;
never a crash, a hang or an anonymous library error. Profiles as in test_fuzz_ops.py (`make fuzz` runs it longer)."""
import os
import struct

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lladapter_ext import loaders  # noqa: E402
from lladapter_ext.model import LlamaConfig, LlamaForCausalLM  # noqa: E402
from llama_helpers import save_ours_as_hf, smollm2_gguf  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("fuzz", max_examples=int(os.environ.get("LLADAPTER_FUZZ_EXAMPLES", "2000")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("LLADAPTER_FUZZ_PROFILE", "ci"))

CONFIG = dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32, adapter_len=2,
              adapter_layer=2)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """The intact files: an HF-layout model (config.json + model.safetensors) and an adapter file."""
    d = tmp_path_factory.mktemp("fuzz_originals")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    save_ours_as_hf(model, d, {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False})
    model.save_adapter(d / "adapter.safetensors")
    return d, model


@st.composite
def corruptions(draw, size: int):
    """A list of edits to a file of `size` bytes: truncation, bit flips (biased to the header), header patches."""
    kind = draw(st.sampled_from(["truncate", "flip", "header length", "flip header"]))
    if kind == "truncate":
        return [("truncate", draw(st.integers(0, size - 1)))]
    if kind == "header length":  # safetensors: the first 8 bytes are the little-endian header length
        return [("write", 0, struct.pack("<Q", draw(st.sampled_from([0, 1, 2**63 - 1, 2**64 - 1, size, size - 8,
                                                                     draw(st.integers(0, 2**64 - 1))]))))]
    hi = min(size, 200) if kind == "flip header" else size
    flips = draw(st.lists(st.tuples(st.integers(0, hi - 1), st.integers(0, 7)), min_size=1, max_size=4))
    return [("flip", pos, bit) for pos, bit in flips]


def apply(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for e in edits:
        if e[0] == "truncate":
            buf = buf[:e[1]]
        elif e[0] == "write":
            buf[e[1]:e[1] + len(e[2])] = e[2]
        else:
            buf[e[1]] ^= 1 << e[2]
    return bytes(buf)


def assert_clear_error(err: BaseException, path) -> None:
    assert isinstance(err, (ValueError, OSError, RuntimeError)), f"{type(err).__name__}: {err}"
    assert os.fspath(path) in str(err), f"the error does not name {path}: {err}"


@given(data=st.data())
def test_fuzz_hf_safetensors(originals, tmp_path_factory, data):
    d, _ = originals
    raw = (d / "model.safetensors").read_bytes()
    edits = data.draw(corruptions(len(raw)))
    work = tmp_path_factory.mktemp("hf")
    (work / "config.json").write_bytes((d / "config.json").read_bytes())
    (work / "model.safetensors").write_bytes(apply(raw, edits))
    try:
        model, _ = loaders.load_hf(work, tokenizer=False)
    except Exception as err:  # noqa: BLE001 - the property is about which errors
        assert_clear_error(err, work)
        return
    assert model.config.dim == 16  # a flip inside tensor data is a valid file with other values


@given(data=st.data())
def test_fuzz_adapter_file(originals, tmp_path_factory, data):
    d, model = originals
    raw = (d / "adapter.safetensors").read_bytes()
    edits = data.draw(corruptions(len(raw)))
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    path.write_bytes(apply(raw, edits))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "adapter" in n}
    try:
        model.load_adapter(path)
    except Exception as err:  # noqa: BLE001
        assert_clear_error(err, path)
        for n, p in model.named_parameters():  # a refused file changes nothing... unless it failed midway
            if n in before:
                assert torch.isfinite(p).all()
        return
    for n, p in model.named_parameters():
        if n in before:
            assert p.shape == before[n].shape and torch.isfinite(p).all()
    with torch.no_grad():  # restore for the next example
        for n, p in model.named_parameters():
            if n in before:
                p.copy_(before[n])


GGUF_HEAD = 1 << 20  # the first MiB: the metadata and tensor index of SmolLM2's GGUF, no full tensor data
# parsing its 49k-token vocabulary takes about a second: a smaller share of the short budget
GGUF_EXAMPLES = 8 if settings().derandomize else settings().max_examples


@settings(max_examples=GGUF_EXAMPLES)
@given(data=st.data())
def test_fuzz_gguf_head(tmp_path_factory, data):
    with open(smollm2_gguf(), "rb") as f:
        raw = f.read(GGUF_HEAD)
    edits = data.draw(corruptions(len(raw)))
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    path.write_bytes(apply(raw, edits))  # truncated in any case: loading must fail, clearly
    with pytest.raises(Exception) as info:
        loaders.load_gguf(path, tokenizer=False)
    assert_clear_error(info.value, path)
