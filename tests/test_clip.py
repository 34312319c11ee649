"""CLIP towers with zero-init gated prompts: open_clip parity (embeddings and tokenizer), zero-init identity,
what trains, position-embedding resampling, adapter save/load, checkpoint errors, the base-to-novel classifier
and the example script."""
import importlib.util
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from lladapter_ext.clip import (CLIP, ClassNameClassifier, CLIPConfig, CLIPTokenizer, harmonic_mean,
                                load_checkpoint_file)
from lladapter_ext.vit import resample_pos_embed

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is a test-only dependency")

# fp32 embeddings of magnitude ~3 after two blocks; nn.MultiheadAttention (open_clip) and our attention sum in
# different orders: differences of a few ulps, ~1e-6.
FP32_TOL = dict(rtol=1e-5, atol=2e-5)

TINY_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def _open_clip_model(cfg):
    """A randomly initialised open_clip CLIP with non-trivial LayerNorms (open_clip inits them to 1/0)."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith(("ln_", "visual.ln_")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _pair(cfg=TINY_CFG):
    ref = _open_clip_model(cfg)
    return ref, CLIP.from_open_clip(ref, cfg).eval()


TEXTS = ["a photo of a cat.", "Hello World!! 123 don't", "naïve café — résumé &amp; &lt;b&gt;",
         "  multiple   spaces\tand\nnewlines ", "日本語のテキスト", "emoji 😀 test", "<|endoftext|> inside",
         "x" * 300, "a " * 100, "", "It's I'M We'll THEY'VE", "1,234.56 $%^&*()", "supercalifragilistic"]


def test_tokenizer_matches_open_clip(tokenizer):
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)
    torch.testing.assert_close(tokenizer(TEXTS), open_clip.tokenize(TEXTS), rtol=0, atol=0)
    long = tokenizer(["a " * 100])[0]
    assert long[-1] == tokenizer.eot_token_id and long.argmax() == 76
    assert tokenizer.decode(tokenizer.encode("Hello World!! naïve café 😀")) == "hello world !! naïve café 😀"
    assert tokenizer("a photo", context_length=5).shape == (1, 5)


@pytest.mark.parametrize("variant", ["gelu", "quick_gelu", "layer_scale"])
def test_open_clip_parity(variant, tokenizer):
    cfg = json.loads(json.dumps(TINY_CFG))
    if variant == "quick_gelu":
        cfg["quick_gelu"] = True
    if variant == "layer_scale":
        cfg["vision_cfg"]["ls_init_value"] = 0.5
        cfg["text_cfg"]["ls_init_value"] = 0.5
    ref, ours = _pair(cfg)
    images = torch.randn(3, 3, 32, 32)
    tokens = tokenizer(["a dog", "a photo of a cat", "x y z"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), ref.encode_image(images), **FP32_TOL)
        torch.testing.assert_close(ours.encode_text(tokens), ref.encode_text(tokens), **FP32_TOL)
        img_logits, _ = ref.get_logits(images, tokens)
        torch.testing.assert_close(ours(images, tokens), img_logits, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name,vision,text", [("ViT-B-16", (768, 12, 12, 16), (512, 12, 8, 512)),
                                               ("ViT-L-14", (1024, 24, 16, 14), (768, 12, 12, 768))])
def test_open_clip_config_shapes(name, vision, text):
    """open_clip's ViT-B-16 / ViT-L-14 JSON give those shapes; converted state-dict names and shapes match."""
    path = os.path.join(os.path.dirname(open_clip.__file__), "model_configs", f"{name}.json")
    with open(path) as f:
        raw = json.load(f)
    cfg = CLIPConfig.from_open_clip(path)
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.heads, cfg.vision.patch_size) == vision
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.embed_dim) == text
    with torch.device("meta"):
        ref = open_clip.CLIP(**raw)
        ours = CLIP(cfg)
    from lladapter_ext.clip import _open_clip_name_to_ours
    converted = {_open_clip_name_to_ours(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    assert converted == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_unsupported_open_clip_options_are_named():
    bad = json.loads(json.dumps(TINY_CFG))
    bad["vision_cfg"]["attentional_pool"] = True
    with pytest.raises(ValueError, match="vision_cfg.attentional_pool=True is not supported"):
        CLIPConfig.from_open_clip(bad)
    bad = json.loads(json.dumps(TINY_CFG))
    bad["text_cfg"]["hf_model_name"] = "roberta-base"
    with pytest.raises(ValueError, match="text_cfg.hf_model_name"):
        CLIPConfig.from_open_clip(bad)
    bad = dict(TINY_CFG, init_logit_bias=-10)
    with pytest.raises(ValueError, match="'init_logit_bias' is not supported"):
        CLIPConfig.from_open_clip(bad)


@pytest.mark.parametrize("towers", [(2, 0), (0, 1), (1, 2)])
def test_zero_init_gates_give_the_frozen_model_exactly(towers, tokenizer):
    _, model = _pair()
    images, tokens = torch.randn(2, 3, 32, 32), tokenizer(["a red car", "two dogs"])
    with torch.no_grad():
        img0, txt0 = model.encode_image(images), model.encode_text(tokens)
    model.add_adapter(vision_layers=towers[0], text_layers=towers[1], prompt_len=4)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), img0)
        assert torch.equal(model.encode_text(tokens), txt0)
        for blk in list(model.visual.blocks) + list(model.text.blocks):
            if blk.attn.gate is not None:
                blk.attn.gate.fill_(0.5)
        changed_img = not torch.allclose(model.encode_image(images), img0, atol=1e-4)
        changed_txt = not torch.allclose(model.encode_text(tokens), txt0, atol=1e-4)
    assert (changed_img, changed_txt) == (towers[0] > 0, towers[1] > 0)


@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_text_prompts_keep_the_causal_mask(mode, tokenizer):
    """A causal text tower with prompts: the embedding at position t ignores tokens after t."""
    _, model = _pair()
    model.add_adapter(text_layers=2, prompt_len=3, mode=mode)
    with torch.no_grad():
        for blk in model.text.blocks:
            if mode == "gated":
                blk.attn.gate.fill_(0.7)
        a = tokenizer(["a photo of a dog"])
        b = a.clone()
        b[0, 8:] = 123  # change only positions after the end-of-text token (index 6)
        b[0, 7] = 5
        # pooled at the end-of-text token (the argmax): unaffected by what follows it
        torch.testing.assert_close(model.encode_text(a), model.encode_text(b), rtol=0, atol=0)


def test_only_prompts_and_gates_receive_gradients(tokenizer):
    _, model = _pair()
    model.add_adapter(vision_layers=1, text_layers=1, prompt_len=4)
    trainable = model.freeze_base()
    assert sorted(trainable) == sorted(f"{t}.blocks.1.attn.{p}" for t in ("visual", "text") for p in ("prompt", "gate"))
    clf = ClassNameClassifier(model, tokenizer)
    names = ["cat", "dog", "golden_retriever"]
    F.cross_entropy(clf(torch.randn(4, 3, 32, 32), names), torch.tensor([0, 1, 2, 1])).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert model.visual.blocks[1].attn.gate.grad.abs().sum() > 0
    assert model.text.blocks[1].attn.gate.grad.abs().sum() > 0


def test_loading_another_image_size_resamples_positions():
    ref = _open_clip_model(TINY_CFG)
    big = json.loads(json.dumps(TINY_CFG))
    big["vision_cfg"]["image_size"] = 48
    ours = CLIP(CLIPConfig.from_open_clip(big))
    ours.load_open_clip_state_dict(ref.state_dict())
    assert ours.visual.positional_embedding.shape == (1 + 36, 32)
    expected = resample_pos_embed(ref.visual.positional_embedding.detach().unsqueeze(0), (4, 4), (6, 6), 1)[0]
    torch.testing.assert_close(ours.visual.positional_embedding.detach(), expected, rtol=0, atol=0)
    # the 32-px model run at 48 px resamples on the fly to the same table
    _, small = _pair()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(small.encode_image(x), ours.eval().encode_image(x), rtol=1e-6, atol=1e-6)


def test_bad_checkpoint_errors_name_the_tensor(tmp_path):
    ref = _open_clip_model(TINY_CFG)
    sd = ref.state_dict()
    cfg = CLIPConfig.from_open_clip(TINY_CFG)
    cases = [
        ({k: v for k, v in sd.items() if k != "visual.transformer.resblocks.1.attn.in_proj_weight"},
         r"missing tensor 'visual\.transformer\.resblocks\.1\.attn\.in_proj_weight'"),
        (dict(sd, **{"transformer.resblocks.0.mlp.c_fc.bias": torch.zeros(3)}),
         r"'transformer\.resblocks\.0\.mlp\.c_fc\.bias' has shape \[3\], expected \[128\]"),
        (dict(sd, logit_bias=torch.zeros(1)), r"unexpected tensor 'logit_bias'"),
        (dict(sd, text_projection=torch.zeros(32, 24, dtype=torch.int32)), r"'text_projection' has dtype torch\.int32"),
    ]
    for bad, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            CLIP(cfg).load_open_clip_state_dict(bad)
    # files: a DDP-prefixed torch.save dict and safetensors both load to the same weights
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    a, b = load_checkpoint_file(tmp_path / "ddp.pt"), load_checkpoint_file(tmp_path / "w.safetensors")
    assert a.keys() == b.keys() == sd.keys()
    # OpenAI's state dicts carry three int entries; they are metadata, not weights
    CLIP(cfg).load_open_clip_state_dict(dict(sd, input_resolution=32, context_length=77, vocab_size=49408))


def test_adapter_save_load_roundtrip_and_errors(tmp_path, tokenizer):
    _, model = _pair()
    model.add_adapter(vision_layers=2, text_layers=1, prompt_len=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_adapter_param(name):
                p.copy_(torch.randn_like(p))
    path = str(tmp_path / "clip_adapter.safetensors")
    model.save_adapter(path)
    _, fresh = _pair()
    fresh.add_adapter(vision_layers=2, text_layers=1, prompt_len=3)
    images, tokens = torch.randn(2, 3, 32, 32), tokenizer(["a", "b c"])
    with torch.no_grad():
        fresh.load_adapter(path)
        assert torch.equal(fresh(images, tokens), model(images, tokens))
    _, other = _pair()
    other.add_adapter(vision_layers=2, text_layers=0, prompt_len=3)
    with pytest.raises(ValueError, match="does not match"):
        other.load_adapter(path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    tensors["text.blocks.1.attn.gate"] = torch.zeros(5)
    save_file(tensors, path, metadata={"lladapter_adapter": json.dumps(fresh.adapter_config)})
    with pytest.raises(ValueError, match=r"'text\.blocks\.1\.attn\.gate' has shape \[5\], expected \[4\]"):
        fresh.load_adapter(path)


def test_base_to_novel_classifier(tokenizer):
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(0.0, 0.0) == 0.0
    _, model = _pair()
    clf = ClassNameClassifier(model, tokenizer, template="a photo of a {}.")
    names = ["cat", "dog", "car"]
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"a photo of a {n}." for n in names]), normalize=True)
        expected = model.logit_scale.exp() * model.encode_image(images, normalize=True) @ text.T
        logits = clf(images, names)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-5)
    labels = expected.argmax(-1)
    assert clf.accuracy(images, labels, names, batch_size=2) == 1.0
    assert clf.accuracy(images, (labels + 1) % 3, names) == 0.0
    with pytest.raises(ValueError, match="template must contain"):
        ClassNameClassifier(model, tokenizer, template="a photo")


def _load_example(name):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name[:-3]] = mod
    spec.loader.exec_module(mod)
    return mod


def test_clip_example_runs_on_random_weights(tmp_path, capsys):
    """examples/clip_adapter.py end to end with a tiny config and random open_clip weights saved to files."""
    from PIL import Image
    example = _load_example("clip_adapter.py")
    cfg_path, ckpt = tmp_path / "tiny.json", tmp_path / "tiny.pt"
    cfg_path.write_text(json.dumps(TINY_CFG))
    torch.save(_open_clip_model(TINY_CFG).state_dict(), ckpt)
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("apple", "bus", "cloud", "dolphin"):
            os.makedirs(tmp_path / "data" / split / cls)
            for i in range(n):
                px = (torch.rand(40, 36, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(px).save(tmp_path / "data" / split / cls / f"{i}.png")
    out = tmp_path / "adapter.safetensors"
    result = example.main(["--model-config", str(cfg_path), "--checkpoint", str(ckpt), "--data", str(tmp_path / "data"),
                           "--shots", "2", "--epochs", "2", "--vision-layers", "1", "--text-layers", "1",
                           "--prompt-len", "2", "--save-adapter", str(out)])
    printed = capsys.readouterr().out
    assert "harmonic mean" in printed
    assert result["base_classes"] == ["apple", "bus"] and result["novel_classes"] == ["cloud", "dolphin"]
    for stage in ("zero_shot", "adapted"):
        r = result[stage]
        assert all(0.0 <= r[k] <= 1.0 for k in ("base", "novel"))
        assert r["hm"] == pytest.approx(harmonic_mean(r["base"], r["novel"]))
    assert os.path.exists(out)
