"""lladapter_ext.adapter: one adapter interface and one file format for every model family, old files included."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lladapter_ext.adapter import ADAPTER_FORMAT, AdapterMixin
from lladapter_ext.model import LlamaForCausalLM

from test_model import small_config
from test_multimodal import tiny_mm
from test_vit import _tiny_model


def families():
    """(family name, a model with an adapter) for every family that needs no optional package."""
    vit = _tiny_model(num_classes=3)
    vit.add_adapter(num_layers=2, prompt_len=4)
    return [("llama", LlamaForCausalLM(small_config())), ("multimodal", tiny_mm()), ("vit", vit)]


def randomise_adapter(model):
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("family", ["llama", "multimodal", "vit"])
def test_every_family_has_the_same_adapter_interface_and_file(family, tmp_path):
    model = dict(families())[family]
    assert isinstance(model, AdapterMixin)
    trainable = model.freeze_base()
    assert trainable == [n for n, _ in model.named_adapter_parameters()]
    assert model.count_trainable() == sum(p.numel() for p in model.adapter_parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if any(p is q for q in model.adapter_parameters())}
    randomise_adapter(model)
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == ADAPTER_FORMAT and meta["family"] == family
    assert all(isinstance(v, str) for v in meta.values())
    fresh = dict(families())[family]
    fresh.load_adapter(path)
    for (n1, t1), (n2, t2) in zip(model.adapter_state_dict().items(), fresh.adapter_state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    # a state dict loads the same way, and a wrong shape names the tensor and the file's expectation
    fresh.load_adapter(model.adapter_state_dict())
    name, t = next(iter(model.adapter_state_dict().items()))
    bad = dict(model.adapter_state_dict(), **{name: torch.zeros(*t.shape[:-1], t.shape[-1] + 1)})
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape {list(bad[name].shape)}, "
                                         rf"expected {list(t.shape)}".replace("[", r"\[").replace("]", r"\]")):
        fresh.load_adapter(bad)


def test_files_written_before_the_common_format_still_load(tmp_path):
    llama = LlamaForCausalLM(small_config())
    randomise_adapter(llama)
    old_llama = tmp_path / "old_llama.safetensors"  # string keys, no "format" / "family"
    save_file({k: v.contiguous() for k, v in llama.adapter_state_dict().items()}, str(old_llama),
              metadata={"adapter_len": "3", "adapter_layer": "2", "gate_act": "tanh", "n_layers": "4"})
    fresh = LlamaForCausalLM(small_config())
    fresh.load_adapter(old_llama)
    assert all(torch.equal(a, b) for a, b in zip(llama.adapter_parameters(), fresh.adapter_parameters()))

    vit = dict(families())["vit"]
    randomise_adapter(vit)
    vit.save_adapter(tmp_path / "new_vit.safetensors")
    old_vit = tmp_path / "old_vit.safetensors"  # the config as JSON under one key
    save_file(load_file(tmp_path / "new_vit.safetensors"), str(old_vit),
              metadata={"lladapter_adapter": json.dumps(vit.adapter_config)})
    fresh_vit = dict(families())["vit"]
    fresh_vit.load_adapter(old_vit)
    assert all(torch.equal(a, b) for a, b in zip(vit.adapter_parameters(), fresh_vit.adapter_parameters()))
