"""ViT with zero-init gated prompts: timm parity, zero-init identity, what trains, position-embedding
resampling, adapter save/load, checkpoint errors."""

import pytest
import torch
import torch.nn.functional as F

from lladapter_ext.vit import VisionTransformer, ViTConfig, resample_pos_embed

timm = pytest.importorskip("timm", reason="timm is a test-only dependency (pip install timm)")

# fp32 features of magnitude ~4 after a few blocks: our attention (reference op, explicit softmax) and timm's
# (F.scaled_dot_product_attention) sum in different orders, so they differ by a few ulps per op, ~1e-6 here.
FP32_TOL = dict(rtol=1e-5, atol=2e-5)


def _perturbed_timm(name, **kw):
    """A randomly initialised timm ViT with non-trivial norms/biases/tokens (timm inits those to 1/0/~0).

    timm's own init is skipped (slow at base size); every tensor gets its init-like value plus noise here.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, weight_init="skip", **kw).eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            base = 1.0 if name_.endswith("norm1.weight") or name_.endswith("norm2.weight") or \
                name_ in ("norm.weight", "fc_norm.weight", "norm_pre.weight") else 0.0
            p.normal_(base, 0.05)
    return model


TINY = {
    "vit_tiny_patch16_224": dict(depth=2, img_size=48, num_classes=7),
    "vit_base_patch16_gap_224": dict(depth=2, embed_dim=64, img_size=32, num_classes=5),  # no class token, avg pool
    "vit_small_patch14_dinov2": dict(depth=2, embed_dim=48, num_heads=3, img_size=28),  # layer scale
    "vit_small_patch14_reg4_dinov2": dict(depth=2, embed_dim=48, num_heads=3, img_size=28),  # registers
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_timm_parity(name):
    ref = _perturbed_timm(name, **TINY[name])
    ours = VisionTransformer.from_timm(ref).eval()
    x = torch.randn(2, 3, *ref.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), **FP32_TOL)
        torch.testing.assert_close(ours(x), ref(x), **FP32_TOL)


def test_timm_parity_base_size():
    """The real ViT-B/16 shape (12 blocks, 768 wide, 224 px), once."""
    ref = _perturbed_timm("vit_base_patch16_224")
    cfg = ViTConfig.from_timm_name("vit_base_patch16_224")
    assert cfg == ViTConfig.from_timm(ref)
    with torch.device("meta"):
        ours = VisionTransformer(cfg)
    ours = ours.to_empty(device="cpu")
    ours.load_timm_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x), **FP32_TOL)


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_gap_224", "vit_small_patch14_dinov2"])
def test_presets_match_timm_architecture(name):
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
        ours = VisionTransformer(ViTConfig.from_timm_name(name))
    assert ViTConfig.from_timm(ref) == ours.config
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def _tiny_model(num_classes=4, **kw):
    torch.manual_seed(1)
    cfg = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=4, num_classes=num_classes)
    cfg.update(kw)
    return VisionTransformer(ViTConfig(**cfg)).eval()


@pytest.mark.parametrize("gate_act", ["tanh", "identity"])
def test_zero_init_gates_give_the_frozen_model_exactly(gate_act):
    model = _tiny_model()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        frozen = model(x)
        frozen_tokens = model.forward_features(x)
    model.add_adapter(num_layers=2, prompt_len=5, gate_act=gate_act)
    with torch.no_grad():
        assert torch.equal(model(x), frozen)
        assert torch.equal(model.forward_features(x), frozen_tokens)
        model.blocks[-1].attn.gate.fill_(0.3)  # a non-zero gate must change the output
        assert not torch.allclose(model(x), frozen, atol=1e-4)


def test_gated_block_is_word_attention_plus_gated_prompt_attention():
    """One adapted attention layer against the formula, written out with F.scaled_dot_product_attention."""
    model = _tiny_model()
    model.add_adapter(num_layers=1, prompt_len=3)
    attn = model.blocks[-1].attn
    with torch.no_grad():
        attn.gate.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
        x = torch.randn(2, 7, 32)
        torch.testing.assert_close(attn(x), expected_gated_attention(attn, x), rtol=1e-5, atol=1e-6)


def expected_gated_attention(attn, x):
    """A PromptedSelfAttention's gated output on x [B, T, D], written out with F.scaled_dot_product_attention:
    softmax(qK) V + tanh(g) softmax(q PK) PV, then the output projection (test_encoder uses it too)."""
    B, T, D = x.shape
    H = attn.num_heads
    d = D // H
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
    pkv = F.linear(attn.prompt, attn.qkv.weight[D:], attn.qkv.bias[D:]).view(-1, 2, H, d).permute(1, 2, 0, 3)
    words = F.scaled_dot_product_attention(q, k, v)
    prompt = F.scaled_dot_product_attention(q, pkv[0].expand(B, -1, -1, -1), pkv[1].expand(B, -1, -1, -1))
    expected = words + torch.tanh(attn.gate).view(1, H, 1, 1) * prompt
    return F.linear(expected.transpose(1, 2).reshape(B, T, D), attn.proj.weight, attn.proj.bias)


def test_joint_mode_is_one_softmax_over_prompt_and_tokens():
    model = _tiny_model()
    model.add_adapter(num_layers=1, prompt_len=3, mode="joint")
    attn = model.blocks[-1].attn
    assert attn.gate is None
    with torch.no_grad():
        x = torch.randn(2, 7, 32)
        B, T, D, H, d = 2, 7, 32, 4, 8
        q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
        pkv = F.linear(attn.prompt, attn.qkv.weight[D:], attn.qkv.bias[D:]).view(3, 2, H, d).permute(1, 2, 0, 3)
        kk = torch.cat((pkv[0].expand(B, -1, -1, -1), k), dim=2)
        vv = torch.cat((pkv[1].expand(B, -1, -1, -1), v), dim=2)
        expected = F.scaled_dot_product_attention(q, kk, vv).transpose(1, 2).reshape(B, T, D)
        expected = F.linear(expected, attn.proj.weight, attn.proj.bias)
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
        # not zero-init: the prompt changes the output from the start
        frozen = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        assert not torch.allclose(attn(x), F.linear(frozen, attn.proj.weight, attn.proj.bias), atol=1e-4)


def test_only_prompts_gates_and_head_receive_gradients():
    model = _tiny_model(num_classes=3)
    model.add_adapter(num_layers=2, prompt_len=4)
    trainable = model.freeze_base()
    assert sorted(trainable) == sorted(
        [f"blocks.{i}.attn.{p}" for i in (1, 2) for p in ("prompt", "gate")] + ["head.weight", "head.bias"])
    assert model.count_trainable() == 2 * (4 * 32 + 4) + 3 * 32 + 3
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    for i in (1, 2):
        attn = model.blocks[i].attn
        assert attn.gate.grad.abs().sum() > 0
        # zero-init: with tanh(0) = 0 the prompt cannot affect the loss yet, so its gradient is exactly zero
        assert torch.count_nonzero(attn.prompt.grad) == 0
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for i in (1, 2):
            model.blocks[i].attn.gate.fill_(0.1)
    F.cross_entropy(model(x), y).backward()
    assert all(model.blocks[i].attn.prompt.grad.abs().sum() > 0 for i in (1, 2))


def test_pos_embed_interpolation_matches_timm_dynamic_size():
    ref = _perturbed_timm("vit_tiny_patch16_224", depth=2, img_size=32, dynamic_img_size=True)
    ours = VisionTransformer.from_timm(ref).eval()
    x = torch.randn(2, 3, 48, 64)  # 3x4 patches from a 2x2 table
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), **FP32_TOL)


def test_loading_a_checkpoint_at_another_resolution_resamples_pos_embed():
    ref = _perturbed_timm("vit_tiny_patch16_224", depth=2, img_size=32, dynamic_img_size=True)
    ours = VisionTransformer(ViTConfig(**{**ViTConfig.from_timm(ref).__dict__, "img_size": 64}))
    ours.load_timm_state_dict(ref.state_dict())
    assert ours.pos_embed.shape == (1, 1 + 16, 192)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().forward_features(x), ref.forward_features(x), **FP32_TOL)
    same = resample_pos_embed(ours.pos_embed, (4, 4), (4, 4), 1)
    assert same is ours.pos_embed
    ours.resize_pos_embed(96)
    assert ours.config.img_size == (96, 96) and ours.pos_embed.shape == (1, 1 + 36, 192)


def test_adapter_save_load_roundtrip(tmp_path):
    model = _tiny_model()
    model.add_adapter(num_layers=2, prompt_len=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_adapter_param(name):
                p.copy_(torch.randn_like(p))
    path = str(tmp_path / "adapter.safetensors")
    model.save_adapter(path)
    fresh = _tiny_model()  # same seed: same frozen weights, different (fresh) adapter
    fresh.add_adapter(num_layers=2, prompt_len=5)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), model(x))
        fresh.load_adapter(path)
        assert torch.equal(fresh(x), model(x))

    other = _tiny_model()
    other.add_adapter(num_layers=1, prompt_len=5)
    with pytest.raises(ValueError, match="does not match"):
        other.load_adapter(path)
    bare = _tiny_model()
    with pytest.raises(ValueError, match="call add_adapter"):
        bare.load_adapter(path)


def test_adapter_file_errors_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    model = _tiny_model()
    model.add_adapter(num_layers=2, prompt_len=5)
    path = str(tmp_path / "a.safetensors")
    model.save_adapter(path)
    meta = {"lladapter_adapter": __import__("json").dumps(model.adapter_config)}
    tensors = load_file(path)

    bad = dict(tensors, **{"blocks.2.attn.prompt": torch.zeros(6, 32)})
    save_file(bad, path, metadata=meta)
    with pytest.raises(ValueError, match=r"blocks\.2\.attn\.prompt.*\[6, 32\].*\[5, 32\]"):
        model.load_adapter(path)
    missing = {k: v for k, v in tensors.items() if k != "blocks.1.attn.gate"}
    save_file(missing, path, metadata=meta)
    with pytest.raises(ValueError, match=r"missing tensor 'blocks\.1\.attn\.gate'"):
        model.load_adapter(path)
    extra = dict(tensors, **{"blocks.0.attn.prompt": torch.zeros(5, 32)})
    save_file(extra, path, metadata=meta)
    with pytest.raises(ValueError, match=r"unexpected tensor 'blocks\.0\.attn\.prompt'"):
        model.load_adapter(path)
    save_file(tensors, path)  # no metadata
    with pytest.raises(ValueError, match="not an lladapter adapter file"):
        model.load_adapter(path)


def test_bad_timm_checkpoint_errors_name_the_tensor():
    ref = _perturbed_timm("vit_tiny_patch16_224", depth=2, img_size=32)
    cfg = ViTConfig.from_timm(ref)
    sd = ref.state_dict()
    cases = [
        ({k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.weight"},
         r"missing tensor 'blocks\.1\.attn\.qkv\.weight'"),
        (dict(sd, **{"blocks.0.mlp.fc1.bias": torch.zeros(5)}),
         r"'blocks\.0\.mlp\.fc1\.bias' has shape \[5\], expected \[768\]"),
        (dict(sd, **{"blocks.7.norm1.weight": torch.zeros(192)}), r"unexpected tensor 'blocks\.7\.norm1\.weight'"),
        (dict(sd, **{"cls_token": torch.zeros(1, 1, 192, dtype=torch.int64)}), r"'cls_token' has dtype torch\.int64"),
        (dict(sd, **{"pos_embed": torch.zeros(1, 7, 192)}), r"'pos_embed' has shape \[1, 7, 192\]"),
    ]
    for bad, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            VisionTransformer(cfg).load_timm_state_dict(bad)


def test_bad_arguments():
    model = _tiny_model()
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 3\] \(vision blocks\), got 4"):
        model.add_adapter(num_layers=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.add_adapter(num_layers=1, mode="lora")
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\], got \[2, 1, 16, 16\]"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="multiple of patch_size 4"):
        model(torch.randn(2, 3, 18, 16))
    with pytest.raises(ValueError, match="global_pool='token' needs class_token=True"):
        ViTConfig(class_token=False)


def _write_idx(path, tensor):
    import gzip
    import struct
    header = struct.pack(">HBB", 0, 0x08, tensor.dim()) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + tensor.to(torch.uint8).numpy().tobytes())


def test_fashion_mnist_example_on_synthetic_idx_files(tmp_path):
    """The example end to end on tiny IDX files in the Fashion-MNIST layout (the real run is documented in
    docs/vit_clip.md): four rows with the parameter counts each method must have."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "vit_adapter_fashion_mnist.py")
    spec = importlib.util.spec_from_file_location("vit_adapter_fashion_mnist", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    gen = torch.Generator().manual_seed(0)
    for prefix, per_class in (("train", 12), ("t10k", 4)):
        labels = torch.arange(10).repeat_interleave(per_class)
        images = torch.randint(0, 256, (len(labels), 28, 28), generator=gen)
        _write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"), images)
        _write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"), labels)
    x = example.read_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"))
    assert x.shape == (40, 28, 28) and x.dtype == torch.uint8
    rows = example.main(["--data-dir", str(tmp_path), "--depth", "2", "--dim", "16", "--heads", "2",
                         "--pretrain-per-class", "10", "--pretrain-epochs", "1", "--adapt-per-class", "5",
                         "--adapt-epochs", "1", "--adapter-layers", "1", "--prompt-len", "3", "--threads", "1"])
    D, H, K, head = 16, 2, 3, 16 * 5 + 5
    params = {r["method"]: r["params"] for r in rows}
    assert params["linear probe"] == head
    assert params["VPT-style prompts (no gate)"] == K * D + head
    assert params["zero-init gated prompts"] == K * D + H + head
    assert params["full fine-tuning"] > 10 * params["zero-init gated prompts"]
    assert all(0.0 <= r["acc"] <= 1.0 and r["seconds"] > 0 for r in rows)
    bad = tmp_path / "bad.gz"
    _write_idx(str(bad), torch.zeros(2, 3))
    import gzip
    with gzip.open(bad, "rb") as f:
        raw = f.read()
    with gzip.open(bad, "wb") as f:
        f.write(raw[:-1])
    with pytest.raises(ValueError, match="data bytes, header says"):
        example.read_idx(str(bad))


def test_meta_dinov2_register_layout_loads():
    """Meta's DINOv2 keeps a class-token position entry and inserts registers after adding positions; timm's
    reg4 model folds that entry into the class token. Both layouts must give the same features."""
    ref = _perturbed_timm("vit_small_patch14_reg4_dinov2", **TINY["vit_small_patch14_reg4_dinov2"])
    sd = ref.state_dict()
    cls_pos = torch.randn(1, 1, sd["cls_token"].shape[-1])
    meta = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta.update(register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - cls_pos,
                pos_embed=torch.cat((cls_pos, sd["pos_embed"]), dim=1),
                mask_token=torch.zeros(1, sd["cls_token"].shape[-1]))
    ours = VisionTransformer(ViTConfig.from_timm(ref))
    ours.load_timm_state_dict(meta)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().forward_features(x), ref.forward_features(x), **FP32_TOL)
