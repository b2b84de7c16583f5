"""The project's Attention: timm's in fp32 (bit for bit), an fp32 attention kernel for bf16 training on CPU."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Attention as TimmAttention
from torch.utils._python_dispatch import TorchDispatchMode

from mae_service.model.attention import Attention

pytestmark = pytest.mark.unit


class _SdpaDtypes(TorchDispatchMode):
    """Records the dtype of q at every attention kernel call."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _pair(dim=64, heads=4):
    torch.manual_seed(0)
    ours, theirs = Attention(dim, heads, qkv_bias=True), TimmAttention(dim, heads, qkv_bias=True)
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same names: registered weights load into timm
    return ours, theirs


def _run(module, x, bf16):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = module(x)
    y.float().square().sum().backward()
    return y, x.grad, module.qkv.weight.grad.clone()


def test_fp32_is_timms_attention_bit_for_bit():
    ours, theirs = _pair()
    x = torch.randn(3, 17, 64)
    for a, b in zip(_run(ours, x, False), _run(theirs, x, False), strict=True):
        assert torch.equal(a, b)


def test_bf16_training_on_cpu_runs_the_kernel_in_fp32_and_stays_close():
    ours, theirs = _pair()
    x = torch.randn(3, 17, 64)
    with _SdpaDtypes() as seen:
        y, gx, gw = _run(ours, x, True)
    assert seen.dtypes and set(seen.dtypes) == {torch.float32}
    assert y.dtype == torch.bfloat16  # the projection after it still runs in bf16
    with _SdpaDtypes() as seen_timm:
        _run(theirs, x, True)
    assert set(seen_timm.dtypes) == {torch.bfloat16}  # what the change is for
    ref = _run(_pair()[1], x, False)  # fp32 reference
    for a, r in zip((y, gx, gw), ref, strict=True):
        rel = (a.float() - r).norm() / r.norm()
        assert rel < 2e-2, rel  # bf16 projections: ~3 significant digits


def test_inference_under_bf16_takes_timms_path():
    ours, _ = _pair()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _SdpaDtypes() as seen:
        ours(torch.randn(2, 9, 64))
    assert set(seen.dtypes) == {torch.bfloat16}


def test_mae_and_classifier_blocks_use_it():
    from mae_service.model import create_model
    from mae_service.model.classifier import classifier_architecture, create_classifier

    m = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, decoder_embed_dim=32,
                     decoder_depth=1, decoder_num_heads=4)  # fmt: skip
    assert all(isinstance(b.attn, Attention) for b in [*m.blocks, *m.decoder_blocks])
    name, kw = m.timm_architecture()
    clf = create_classifier(
        classifier_architecture({"timm_name": name, "timm_kwargs": kw, "image_size": 32}, 5, blocks=None, drop_path=0.0)
    )
    assert all(isinstance(b.attn, Attention) for b in clf.blocks)
