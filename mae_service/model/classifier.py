"""A registered MAE encoder as a timm ViT classifier: the fine-tuning architecture, what is frozen, the lr groups.

Global average pooling of the patch tokens followed by ``fc_norm`` (the paper's fine-tuning head; timm's
``global_pool="avg", fc_norm=True``), drop path, and a linear head. The pretrained final ``norm.*`` initialises
``fc_norm.*``. ``blocks=K`` trains only the last K blocks, ``fc_norm`` and the head (the paper's partial
fine-tuning); ``blocks=0`` is the paper's linear probe: everything frozen, a BatchNorm without affine parameters
before the linear head. Frozen blocks run without drop path. Layer-wise lr decay comes from timm's
``param_groups_layer_decay`` (each group's ``lr_scale``). Pure torch + timm.

Shapes: ``N`` images, ``D`` feature width, ``C`` classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mae_service.model.attention import Attention

CLASSIFIER_FORMAT = "mae-service-classifier/1"


def classifier_architecture(
    encoder_arch: dict[str, Any], num_classes: int, *, blocks: int | None, drop_path: float
) -> dict[str, Any]:
    """What :func:`create_classifier` builds from a registered encoder's ``mae_architecture`` (JSON-able)."""
    kwargs = dict(encoder_arch["timm_kwargs"])
    depth = int(kwargs["depth"])
    if blocks is not None and not 0 <= blocks <= depth:
        raise ValueError(f"blocks={blocks}: must be between 0 and the encoder's depth {depth}")
    kwargs.update(num_classes=int(num_classes), global_pool="avg", fc_norm=True, drop_path_rate=float(drop_path))
    return {
        "format": CLASSIFIER_FORMAT,
        "timm_name": encoder_arch["timm_name"],
        "timm_kwargs": kwargs,
        "image_size": int(encoder_arch["image_size"]),
        "num_classes": int(num_classes),
        "blocks": blocks,
        "probe_head": blocks == 0,
    }


def create_classifier(arch: dict[str, Any], *, seed: int | None = None) -> nn.Module:
    """The timm ``VisionTransformer`` classifier of ``arch`` (timm's random initialisation; seeded when ``seed``).

    The parameters the architecture freezes have ``requires_grad=False``; frozen blocks carry no drop path."""
    import timm

    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        # the project's Attention: timm's, with its fp32 attention kernel for bf16 training on CPU (same names)
        model: Any = timm.create_model(arch["timm_name"], pretrained=False, attn_layer=Attention, **arch["timm_kwargs"])
    if arch["probe_head"]:
        width = int(arch["timm_kwargs"]["embed_dim"])
        model.head = nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), model.head)
    blocks = arch["blocks"]
    if blocks is not None:
        for p in model.parameters():
            p.requires_grad_(False)
        depth = len(model.blocks)
        for i, blk in enumerate(model.blocks):
            if i < depth - blocks:
                blk.drop_path1, blk.drop_path2 = nn.Identity(), nn.Identity()
            else:
                blk.requires_grad_(True)
        if blocks > 0:
            model.fc_norm.requires_grad_(True)
        model.head.requires_grad_(True)
    model.mae_classifier = dict(arch)
    return model


def encoder_to_classifier_state(encoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A registered encoder's (timm, ``fc_norm=False``) weights under the classifier's names: ``norm.*`` →
    ``fc_norm.*`` (pool, then the pretrained final norm); the head is left to timm's initialisation."""
    return {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in encoder_state.items()}


def load_encoder_weights(model: nn.Module, encoder_state: dict[str, torch.Tensor]) -> None:
    """Load the encoder's weights into ``model``: every parameter but the head's must be covered, nothing extra."""
    missing, unexpected = model.load_state_dict(encoder_to_classifier_state(encoder_state), strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(
            f"encoder weights do not fit the classifier: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def layer_decay_groups(model: nn.Module, *, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups with timm's layer-wise lr decay: ``lr_scale = layer_decay ** (depth + 1 - layer)``
    with layer 0 the patch/position embeddings, ``i + 1`` block ``i`` and ``depth + 1`` the norm and head; no weight
    decay on 1-D tensors and on ``model.no_weight_decay()`` (the position embedding, class token). Frozen
    parameters are left out."""
    from timm.optim import param_groups_layer_decay

    skip = getattr(model, "no_weight_decay", lambda: ())()
    return param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
    )


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr`` × each group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many of ``labels`` ``[N]`` are among the top-k of ``logits`` ``[N, C]``, for each k ≤ C (else 0)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # [N, k]
    hit = top == labels[:, None]
    return [int(hit[:, :k].any(dim=1).sum()) if k <= logits.shape[1] else 0 for k in ks]
