"""Checkpoint interoperability: released MAE files, timm encoders, Hugging Face ``ViTMAEForPreTraining``.

- Released layout: ``{"model": state_dict}`` with this package's own parameter names (they are the reference's).
- timm: :meth:`MaskedAutoencoder.encoder_state_dict_timm` + :meth:`MaskedAutoencoder.timm_architecture`, or
  :func:`to_timm_encoder` which builds and loads the timm model in one call.
- Wrapped models: :func:`unwrap` (DDP / ``torch.compile``) and :func:`is_mae`, for code handed either an MAE or
  a plain encoder (the registry, the evaluation).
- Hugging Face: :func:`to_hf_state_dict` / :func:`hf_config` / :func:`save_hf_pretrained` write a directory that
  ``transformers.ViTMAEForPreTraining.from_pretrained`` loads (``config.json`` + ``model.safetensors``).
  Transformers ≥ 5 names its layers ``vit.layers.i.attention.q_proj`` …; 4.x used
  ``vit.encoder.layer.i.attention.attention.query`` …; ``layout="auto"`` picks the installed version's names.

Imports neither transformers nor timm at module import time.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from mae_service.model.mae import IMAGENET_MEAN, IMAGENET_STD, MaskedAutoencoder

logger = logging.getLogger(__name__)

HF_LAYOUTS = ("auto", "v5", "v4")


# ---- released MAE checkpoints -------------------------------------------------------------------------------------
def load_reference_checkpoint(model: MaskedAutoencoder, path: str | os.PathLike) -> None:
    """Load a file in the released MAE layout (``{"model": state_dict}``, or a bare state dict) strictly.

    Read with ``torch.load(weights_only=True)``: no pickled code runs. Raises ``ValueError`` when the file is not
    that layout or its keys/shapes differ from the model's (the message lists the differences).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused (e.g. a training checkpoint with argparse args) or not a torch file
        raise ValueError(f"{path}: not a weights-only torch checkpoint ({type(e).__name__}: {e})") from e
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected {{'model': state_dict}} (the released MAE layout) or a state dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not match the model {model.model_args}: missing {missing[:8]}"
            f"{'…' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{'…' if len(unexpected) > 8 else ''}, shape mismatches {shapes[:8]}"
        )
    model.load_state_dict(state, strict=True)


# ---- wrapped models ---------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def is_mae(model: object) -> TypeGuard[MaskedAutoencoder]:
    """Whether ``model`` (already unwrapped) is a masked autoencoder: it can export a timm encoder."""
    return hasattr(model, "encoder_state_dict_timm") and hasattr(model, "timm_architecture")


# ---- timm -------------------------------------------------------------------------------------------------------
def to_timm_encoder(model: MaskedAutoencoder) -> nn.Module:
    """A timm ``VisionTransformer`` (``num_classes=0``) carrying this model's encoder weights, loaded strictly.

    ``model`` may be DDP- or ``torch.compile``-wrapped; the encoder is a CPU copy, in the timm default train mode.
    """
    import timm

    core = unwrap(model)
    if not is_mae(core):
        raise ValueError(f"to_timm_encoder needs a MaskedAutoencoder, got {type(core).__name__}")
    name, kwargs = core.timm_architecture()
    enc = timm.create_model(name, pretrained=False, **kwargs)
    enc.load_state_dict({k: v.detach().cpu() for k, v in core.encoder_state_dict_timm().items()}, strict=True)
    return enc


# ---- Hugging Face -------------------------------------------------------------------------------------------------
def _resolve_layout(layout: str) -> str:
    if layout not in HF_LAYOUTS:
        raise ValueError(f"layout={layout!r}: allowed {', '.join(HF_LAYOUTS)}")
    if layout != "auto":
        return layout
    try:
        import transformers
    except ImportError:
        return "v5"
    return "v4" if int(transformers.__version__.split(".")[0]) < 5 else "v5"


def _hf_block(src: dict[str, Tensor], s: str, d: str, layout: str) -> dict[str, Tensor]:
    """One timm ``Block`` (prefix ``s``) → one HF ``ViTMAELayer`` (prefix ``d``)."""
    out: dict[str, Tensor] = {}
    q, k, v = src[f"{s}attn.qkv.weight"].chunk(3, dim=0)  # timm's fused qkv rows are [q; k; v]
    qb, kb, vb = src[f"{s}attn.qkv.bias"].chunk(3, dim=0)
    if layout == "v5":
        names = dict(
            q="attention.q_proj",
            k="attention.k_proj",
            v="attention.v_proj",
            o="attention.o_proj",
            fc1="mlp.fc1",
            fc2="mlp.fc2",
        )
    else:
        names = dict(
            q="attention.attention.query",
            k="attention.attention.key",
            v="attention.attention.value",
            o="attention.output.dense",
            fc1="intermediate.dense",
            fc2="output.dense",
        )
    for key, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
        out[f"{d}{names[key]}.weight"], out[f"{d}{names[key]}.bias"] = w, b
    for ours, theirs in (
        ("attn.proj", names["o"]),
        ("mlp.fc1", names["fc1"]),
        ("mlp.fc2", names["fc2"]),
        ("norm1", "layernorm_before"),
        ("norm2", "layernorm_after"),
    ):
        out[f"{d}{theirs}.weight"] = src[f"{s}{ours}.weight"]
        out[f"{d}{theirs}.bias"] = src[f"{s}{ours}.bias"]
    return out


def to_hf_state_dict(model: MaskedAutoencoder, layout: str = "auto") -> dict[str, Tensor]:
    """The whole model under ``ViTMAEForPreTraining`` names (contiguous CPU copies)."""
    layout = _resolve_layout(layout)
    src = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    enc_layer = "vit.layers." if layout == "v5" else "vit.encoder.layer."
    out = {
        "vit.embeddings.cls_token": src["cls_token"],
        "vit.embeddings.position_embeddings": src["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
        "vit.layernorm.weight": src["norm.weight"],
        "vit.layernorm.bias": src["norm.bias"],
        "decoder.mask_token": src["mask_token"],
        "decoder.decoder_pos_embed": src["decoder_pos_embed"],
    }
    for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
        out[f"decoder.{name}.weight"] = src[f"{name}.weight"]
        out[f"decoder.{name}.bias"] = src[f"{name}.bias"]
    for i in range(model.depth):
        out.update(_hf_block(src, f"blocks.{i}.", f"{enc_layer}{i}.", layout))
    for i in range(model.decoder_depth):
        out.update(_hf_block(src, f"decoder_blocks.{i}.", f"decoder.decoder_layers.{i}.", layout))
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_config(model: MaskedAutoencoder) -> dict[str, Any]:
    """``config.json`` content of the matching ``ViTMAEConfig`` (``ViTMAEConfig(**hf_config(m))`` also works)."""
    return {
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "hidden_size": model.embed_dim,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "intermediate_size": int(model.embed_dim * model.mlp_ratio),  # timm's Mlp hidden width
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": model.img_size,
        "patch_size": model.patch_size,
        "num_channels": model.in_chans,
        "qkv_bias": True,
        "decoder_num_attention_heads": model.decoder_num_heads,
        "decoder_hidden_size": model.decoder_embed_dim,
        "decoder_num_hidden_layers": model.decoder_depth,
        "decoder_intermediate_size": int(model.decoder_embed_dim * model.mlp_ratio),
        "mask_ratio": model.mask_ratio,
        "norm_pix_loss": model.norm_pix_loss,
    }


def save_hf_pretrained(model: MaskedAutoencoder, out_dir: str | os.PathLike, layout: str = "auto") -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` for
    ``ViTMAEForPreTraining.from_pretrained(out_dir)`` / ``ViTImageProcessor.from_pretrained(out_dir)``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model, layout), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": model.img_size, "width": model.img_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    logger.info("wrote Hugging Face ViTMAEForPreTraining files to %s", out)
    return out
