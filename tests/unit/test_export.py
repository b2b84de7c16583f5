"""Checkpoint interoperability: timm encoder, Hugging Face ViTMAE directory, released MAE checkpoint files."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch

from mae_service.model import create_model
from mae_service.model.export import (
    hf_config,
    is_mae,
    load_reference_checkpoint,
    save_hf_pretrained,
    to_hf_state_dict,
    to_timm_encoder,
    unwrap,
)

TINY = dict(img_size=64, depth=2, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


def tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return create_model("mae_vit_tiny_patch16", **{**TINY, **kw})


# ---- timm ------------------------------------------------------------------------------------------------------
def _check_timm_roundtrip(m, enc, size):
    m.eval()
    enc.eval()
    imgs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = m.forward_features(imgs)
        theirs = enc.forward_features(imgs)
        pooled = enc(imgs)
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() <= 1e-5
    # num_classes=0: the pooled feature is the mean of the final-normed patch tokens (global_pool=avg, no fc_norm)
    assert enc.global_pool == "avg"
    torch.testing.assert_close(pooled, ours[:, 1:].mean(dim=1), atol=1e-5, rtol=0)


def test_timm_export_vit_base_patch16_224_literal_name():
    torch.manual_seed(0)
    m = create_model("mae_vit_base_patch16")
    assert m.timm_architecture()[0] == "vit_base_patch16_224"
    enc = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="avg", fc_norm=False)
    result = enc.load_state_dict(m.encoder_state_dict_timm(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _check_timm_roundtrip(m, enc, 224)


def test_timm_export_tiny_config_via_architecture():
    m = tiny()
    name, kwargs = m.timm_architecture()
    assert name == "vit_tiny_patch16_224" and kwargs["num_classes"] == 0 and kwargs["depth"] == 2
    enc = timm.create_model(name, pretrained=False, **kwargs)
    enc.load_state_dict(m.encoder_state_dict_timm(), strict=True)
    _check_timm_roundtrip(m, enc, 64)
    _check_timm_roundtrip(m, to_timm_encoder(m), 64)


def test_unwrap_is_mae_and_to_timm_encoder_of_a_wrapped_model():
    m = tiny()

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel / torch.compile look like from outside
        def __init__(self, inner, attr):
            super().__init__()
            setattr(self, attr, inner)

    wrapped = Wrapper(Wrapper(m, "_orig_mod"), "module")
    assert unwrap(wrapped) is m and unwrap(m) is m
    assert is_mae(m) and not is_mae(wrapped)
    enc = to_timm_encoder(wrapped)
    _check_timm_roundtrip(m, enc, 64)
    with pytest.raises(ValueError, match="needs a MaskedAutoencoder"):
        to_timm_encoder(enc)


def test_timm_state_dict_is_a_copy_without_decoder():
    m = tiny()
    sd = m.encoder_state_dict_timm()
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    sd["cls_token"].add_(1.0)
    assert not torch.equal(sd["cls_token"], m.cls_token)


# ---- Hugging Face ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["auto", "v4"])  # v4: the 4.x names (facebook/vit-mae-* files) also load
def test_hf_export_loads_with_from_pretrained(tmp_path, layout):
    from transformers import ViTImageProcessor, ViTMAEForPreTraining

    m = tiny(norm_pix_loss=True, mask_ratio=0.6).eval()
    save_hf_pretrained(m, tmp_path / "hf", layout=layout)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["layer_norm_eps"] == 1e-6 and cfg["norm_pix_loss"] is True and cfg["mask_ratio"] == 0.6
    hf, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.layer_norm_eps == 1e-6
    hf.eval()
    imgs = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask = m(imgs, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(out.mask, mask)
    assert abs(out.loss.item() - loss.item()) <= 1e-6 and (out.logits - pred).abs().max().item() <= 1e-5
    proc = ViTImageProcessor.from_pretrained(tmp_path / "hf")
    assert proc.size == {"height": 64, "width": 64} and tuple(proc.image_mean) == (0.485, 0.456, 0.406)


def test_hf_state_dict_covers_every_parameter_once():
    m = tiny()
    sd = to_hf_state_dict(m)
    n_ours = sum(v.numel() for v in m.state_dict().values())
    assert sum(v.numel() for v in sd.values()) == n_ours
    assert hf_config(m)["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="layout='v3'.*auto, v5, v4"):
        to_hf_state_dict(m, layout="v3")
    legacy = to_hf_state_dict(m, layout="v4")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    assert "decoder.decoder_layers.0.output.dense.bias" in legacy


# ---- released MAE checkpoint layout ---------------------------------------------------------------------------
def test_released_layout_checkpoint_loads_strictly(tmp_path):
    src, dst = tiny(seed=1), tiny(seed=2)
    path = tmp_path / "mae_visualize.pth"
    torch.save({"model": src.state_dict()}, path)
    load_reference_checkpoint(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_released_layout_checkpoint_mismatches_raise(tmp_path):
    m = tiny()
    sd = m.state_dict()
    missing = {k: v for k, v in sd.items() if k != "decoder_norm.bias"}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing.*decoder_norm.bias"):
        load_reference_checkpoint(m, tmp_path / "missing.pth")
    torch.save({"model": {**sd, "head.weight": torch.zeros(2)}}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected.*head.weight"):
        load_reference_checkpoint(m, tmp_path / "extra.pth")
    torch.save({"model": {**sd, "mask_token": torch.zeros(1, 1, 8)}}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="mask_token"):
        load_reference_checkpoint(m, tmp_path / "shape.pth")
    # pickled objects are refused (weights_only=True): nothing from the file runs
    torch.save({"model": sd, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights-only"):
        load_reference_checkpoint(m, tmp_path / "pickled.pth")
