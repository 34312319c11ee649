"""Multi-modal LLaMA-Adapter (the paper's ScienceQA variant): a frozen image encoder gives a global feature per
image, a learnable projection maps it to the LLM width D, and the result is added to every adaption prompt token
of every adapted layer, ``P_l + repeat(proj(f_img))``, so the prompt keys/values are per sample
(``LlamaForCausalLM.forward(prompt_offset=...)``). Trained: the projection, the prompts and the gates; with
gates at zero the model's text logits are the frozen LLM's, whatever the image.

The image encoders (frozen; one feature vector per image) are lladapter_ext.image_encoders'; the question
answering and scoring helpers of the ScienceQA evaluation are lladapter_ext.mm_data's.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .adapter import AdapterMixin
from .image_encoders import (CLIPImageEncoder, EfficientNetLite0Encoder, ImageEncoder,  # noqa: F401 (re-exported)
                             ModuleImageEncoder, ViTImageEncoder, build_encoder, efficientnet_lite0_weights_path,
                             map_efficientnet_lite0_state_dict)
from .mm_data import answer_questions, question_features  # noqa: F401 (re-exported)
from .model import LlamaForCausalLM, enable_activation_checkpointing

__all__ = ["VisualProjection", "MultiModalLlama", "PROJECTION_PREFIX", "scienceqa_dataset", "evaluate_scienceqa"]

PROJECTION_PREFIX = "visual_proj."


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
        self.llm.check_adapter_metadata(meta, tensors, source)

    @classmethod
    def from_adapter(cls, llm: LlamaForCausalLM, path: str | os.PathLike, encoder: str | None = None
                     ) -> MultiModalLlama:
        """``llm`` wrapped with the encoder and projection that the multi-modal adapter file at ``path`` was trained
        with (its metadata records them; ``encoder``: a build_encoder spec to use instead), the adapter loaded."""
        from .adapter import read_adapter_metadata

        meta = read_adapter_metadata(path)
        if meta.get("multimodal") != "1":
            raise ValueError(f"--adapter {os.fspath(path)} is a text-only adapter (no image projection)")
        spec = encoder or meta.get("encoder")
        if not spec or spec == "precomputed":
            raise ValueError("the adapter does not record its encoder; give --encoder SPEC")
        hidden = meta.get("projection_hidden", "None")
        try:
            hidden = None if hidden == "None" else int(hidden)
        except ValueError:
            raise ValueError(f"--adapter {os.fspath(path)}: metadata projection_hidden={hidden!r} is not an "
                             "integer (a corrupt or hand-edited file?)") from None
        model = cls(llm, build_encoder(spec), projection=meta.get("projection", "linear"), projection_hidden=hidden)
        return model.load_adapter(path)

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
                image_mask: torch.Tensor | None = None, logits_to_keep: int = 0):
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
                        cache=cache, prompt_offset=offset, logits_to_keep=logits_to_keep)


# --------------------------------------------------------------------------------------------- jobs
def scienceqa_dataset(model: MultiModalLlama, tokenizer, data_paths: Sequence[str], images_dir: str,
                      split: str | None, max_seq_len: int, *, limit: int | None = None, cache_file: str | None = None,
                      progress: bool = True):
    """(questions, tokenised data set with the image features set) of the ScienceQA-format files ``data_paths``
    (images under ``images_dir``; only ``split`` when given; the first ``limit`` questions). The features come
    from ``model``'s frozen encoder, once per image (cached in ``cache_file`` when given)."""
    from .mm_data import load_scienceqa, tokenize_questions

    questions = []
    for path in data_paths:
        questions += load_scienceqa(path, images_dir=images_dir, split=split)
    questions = questions[:limit]
    ds = tokenize_questions(questions, tokenizer, max_seq_len)
    ds.set_features(model.encode_paths(ds.image_paths, cache_file=cache_file, progress=progress))
    return questions, ds


def evaluate_scienceqa(model: MultiModalLlama, tokenizer, data_paths: Sequence[str], images_dir: str,
                       split: str | None, max_seq_len: int, *, limit: int | None = None,
                       cache_file: str | None = None, progress: bool = True) -> dict:
    """Exact-choice accuracy (mm_data.score_answers' dict) of ``model``'s greedy answers to the ScienceQA questions
    that scienceqa_dataset reads with the same arguments."""
    from .mm_data import score_answers

    questions, ds = scienceqa_dataset(model, tokenizer, data_paths, images_dir, split, max_seq_len, limit=limit,
                                      cache_file=cache_file, progress=progress)
    features, mask = question_features(ds)
    return score_answers(answer_questions(model, tokenizer, questions, features, mask), questions)
