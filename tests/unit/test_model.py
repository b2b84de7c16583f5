"""The MAE model: presets, masking, loss, gradients, initialisation, bad input, and parity with HF ViTMAE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mae_service.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_NAMES,
    MaskedAutoencoder,
    create_model,
    normalize,
    preset,
)
from mae_service.model.export import hf_config, to_hf_state_dict

# A small but complete model: 4x4 patch grid, 2 encoder blocks, 1 decoder block.
SMALL = dict(img_size=32, patch_size=8, depth=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


def small_model(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return create_model("mae_vit_tiny_patch16", **{**SMALL, **kw})


# ---- presets and factory ----------------------------------------------------------------------------------------
def test_model_names_and_presets():
    assert {
        "mae_vit_tiny_patch16",
        "mae_vit_small_patch16",
        "mae_vit_base_patch16",
        "mae_vit_large_patch16",
        "mae_vit_huge_patch14",
    } <= set(MODEL_NAMES)
    expected = {
        "mae_vit_tiny_patch16": (16, 192, 12, 3),
        "mae_vit_small_patch16": (16, 384, 12, 6),
        "mae_vit_base_patch16": (16, 768, 12, 12),
        "mae_vit_large_patch16": (16, 1024, 24, 16),
        "mae_vit_huge_patch14": (14, 1280, 32, 16),
    }
    for name, (p, d, depth, heads) in expected.items():
        cfg = preset(name)
        assert (cfg["patch_size"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["mlp_ratio"]) == (
            p,
            d,
            depth,
            heads,
            4.0,
        )
    preset("mae_vit_base_patch16")["embed_dim"] = 1  # a copy: the registry is not changed
    assert preset("mae_vit_base_patch16")["embed_dim"] == 768


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_preset_builds_full_size_on_meta_and_runs_shallow(name):
    cfg = preset(name)
    with torch.device("meta"):  # full depth and width, no memory, no time
        m = create_model(name)
    assert len(m.blocks) == cfg["depth"] and m.embed_dim == cfg["embed_dim"] and m.patch_size == cfg["patch_size"]
    assert m.blocks[0].attn.num_heads == cfg["num_heads"] == m.num_heads and m.depth == cfg["depth"]
    assert (m.decoder_embed_dim, len(m.decoder_blocks), m.decoder_blocks[0].attn.num_heads) == (512, 8, 16)
    assert m.num_patches == (224 // cfg["patch_size"]) ** 2 and m.mask_ratio == 0.75
    # the encoder part has exactly the parameters of the matching timm ViT
    import timm

    tname, kwargs = m.timm_architecture()
    with torch.device("meta"):
        enc = timm.create_model(tname, pretrained=False, **kwargs)
    assert {k: v.shape for k, v in enc.state_dict().items()} == {
        k: v.shape for k, v in m.encoder_state_dict_timm().items()
    }
    # a shallow real one runs forward and backward
    p = cfg["patch_size"]
    small = create_model(name, img_size=2 * p, depth=1, decoder_depth=1)
    loss, pred, mask = small(torch.randn(2, 3, 2 * p, 2 * p))
    loss.backward()
    assert pred.shape == (2, 4, p * p * 3) and mask.shape == (2, 4) and torch.isfinite(loss)


def test_reference_vit_base_parameter_count():
    with torch.device("meta"):
        m = create_model("mae_vit_base_patch16")
    # 111,907,840 parameters in the released mae_vit_base_patch16 (pos embeds included)
    assert sum(p.numel() for p in m.parameters()) == 111_907_840


def test_model_args_rebuild_the_same_model():
    m = small_model(norm_pix_loss=True, mask_ratio=0.6)
    assert m.model_args == {"name": "mae_vit_tiny_patch16", **SMALL, "norm_pix_loss": True, "mask_ratio": 0.6}
    again = create_model(**m.model_args)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert (again.norm_pix_loss, again.mask_ratio, again.img_size) == (True, 0.6, 32)
    assert create_model("mae_vit_tiny_patch16", patch_size=None, img_size=32).patch_size == 16  # None keeps preset


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(name="mae_vit_gigantic"), ["mae_vit_gigantic", "mae_vit_base_patch16"]),
        (dict(name="mae_vit_tiny_patch16", img_size=30), ["img_size=30", "patch_size=16"]),
        (dict(name="mae_vit_tiny_patch16", mask_ratio=0.0), ["mask_ratio=0.0", "(0, 1)"]),
        (dict(name="mae_vit_tiny_patch16", mask_ratio=1.0), ["mask_ratio=1.0", "(0, 1)"]),
        (dict(name="mae_vit_tiny_patch16", mask_ratio=-0.5), ["mask_ratio=-0.5"]),
        (dict(name="mae_vit_tiny_patch16", decoder_embed_dim=100, decoder_num_heads=16), ["decoder_embed_dim=100"]),
        (dict(name="mae_vit_tiny_patch16", decoder_depth=0), ["decoder_depth=0"]),
        (dict(name="mae_vit_tiny_patch16", colour="red"), ["colour", "decoder_depth", "img_size"]),
    ],
)
def test_bad_model_arguments_raise_valueerror_naming_value(kwargs, words):
    with pytest.raises(ValueError) as e:
        create_model(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_preset_unknown_name():
    with pytest.raises(ValueError, match="allowed.*mae_vit_tiny_patch16"):
        preset("vit_b")


def test_bad_images_and_ratios_at_forward():
    m = small_model()
    x = torch.randn(2, 3, 32, 32)
    for bad, words in [
        (torch.randn(3, 32, 32), "[N, 3, 32, 32]"),
        (torch.randn(2, 1, 32, 32), "[N, 3, 32, 32]"),
        (torch.randn(2, 3, 48, 48), "[2, 3, 48, 48]"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "torch.uint8"),
        (np.zeros((2, 3, 32, 32), np.float32), "ndarray"),
    ]:
        with pytest.raises(ValueError) as e:
            m(bad)
        assert words in str(e.value)
    for r in (0.0, 1.0, 1.2, -0.1):
        with pytest.raises(ValueError, match=r"mask_ratio=.*\(0, 1\)"):
            m(x, mask_ratio=r)
    with pytest.raises(ValueError, match="noise must have shape"):
        m(x, noise=torch.rand(2, 15))


def test_normalize():
    imgs = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    out = normalize(imgs)
    assert out.dtype == torch.float32 and out.shape == imgs.shape and out.device == imgs.device
    exp = (imgs.numpy().astype(np.float64) / 255.0 - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[
        :, None, None
    ]
    np.testing.assert_allclose(out.numpy(), exp, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        normalize(imgs.float())
    with pytest.raises(ValueError, match=r"\[2, 1, 5, 7\]"):
        normalize(imgs[:, :1])
    with pytest.raises(ValueError, match=r"\[3, 5, 7\]"):
        normalize(imgs[0])


# ---- patches and masking ----------------------------------------------------------------------------------------
def test_patchify_layout_and_roundtrip():
    m = small_model()
    imgs = torch.randn(2, 3, 32, 32)
    x = m.patchify(imgs)
    assert x.shape == (2, 16, 8 * 8 * 3)
    # patch (r, c) is number r*4 + c; within it pixel (i, j) channel ch is element (i*8 + j)*3 + ch
    n, r, c, i, j, ch = 1, 2, 3, 5, 6, 2
    assert x[n, r * 4 + c, (i * 8 + j) * 3 + ch] == imgs[n, ch, r * 8 + i, c * 8 + j]
    assert torch.equal(m.unpatchify(x), imgs)


@pytest.mark.parametrize("length, ratio", [(16, 0.75), (196, 0.75), (49, 0.6), (10, 0.33), (196, 0.9)])
def test_random_masking_keeps_int_l_times_1_minus_r_and_restores(length, ratio):
    m = small_model()
    g = torch.Generator().manual_seed(length)
    x = torch.randn(3, length, 5, generator=g)
    noise = torch.rand(3, length, generator=g)
    x_masked, mask, ids_restore = m.random_masking(x, ratio, noise)
    keep = int(length * (1 - ratio))
    assert x_masked.shape == (3, keep, 5)
    assert mask.shape == (3, length) and torch.equal(mask.sum(1), torch.full((3,), float(length - keep)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for n in range(3):
        kept = torch.argsort(noise[n])[:keep]  # the smallest noise values are kept, in ascending noise order
        assert torch.equal(x_masked[n], x[n, kept])
        assert torch.equal(mask[n, kept], torch.zeros(keep)) and mask[n].sum() == length - keep
    # ids_restore undoes the shuffle
    ids_shuffle = torch.argsort(noise, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle[..., None].expand_as(x))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[..., None].expand_as(x)), x)
    # without noise: random, still the right count per sample
    _, mask2, _ = m.random_masking(x, ratio)
    assert torch.equal(mask2.sum(1), torch.full((3,), float(length - keep)))


def test_forward_shapes_and_mask_follow_noise():
    m = small_model()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    loss, pred, mask = m(imgs, noise=noise)
    assert loss.shape == () and pred.shape == (2, 16, 192) and mask.shape == (2, 16)
    expected = torch.ones(2, 16)
    expected.scatter_(1, torch.argsort(noise, 1)[:, :4], 0.0)  # int(16 * 0.25) = 4 kept
    assert torch.equal(mask, expected)
    latent, _, _ = m.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 1 + 4, 192)  # encoder sees visible patches only (+ cls)


def test_forward_features_equal_encoder_without_masking():
    m = small_model().eval()
    imgs = torch.randn(2, 3, 32, 32)
    identity_order = torch.arange(16, dtype=torch.float32).expand(2, 16)
    with torch.no_grad():
        latent, mask, _ = m.forward_encoder(imgs, 0.0, identity_order)
        feats = m.forward_features(imgs)
    assert feats.shape == (2, 17, 192) and mask.sum() == 0
    torch.testing.assert_close(feats, latent, atol=1e-6, rtol=0)


# ---- loss ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_reads_removed_patches_only(norm_pix):
    m = small_model(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask = m(imgs, noise=noise)
        changed = pred.clone()
        changed[mask == 0] += 100.0  # visible patches
        assert m.forward_loss(imgs, changed, mask) == loss
        changed = pred.clone()
        changed[mask == 1] += 0.1  # removed patches
        assert m.forward_loss(imgs, changed, mask) != loss
        # the loss equals the mean of per-patch MSE over removed patches (computed here by hand)
        target = m.patchify(imgs)
        if norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(-1)
        torch.testing.assert_close(loss, per_patch[mask == 1].mean(), atol=1e-6, rtol=0)
        # the training path (prediction head on removed patches only) gives the same loss
        fast, none, mask_fast = m(imgs, noise=noise, return_pred=False)
    assert none is None and torch.equal(mask_fast, mask)
    assert abs(fast.item() - loss.item()) <= 1e-6


def test_norm_pix_variance_is_unbiased():
    m = small_model(norm_pix_loss=True)
    patches = torch.randn(1, 1, 192)
    t = m._target(patches)
    mean, var = patches.mean(), patches.var(unbiased=True)
    torch.testing.assert_close(t, (patches - mean) / torch.sqrt(var + 1e-6))


@pytest.mark.parametrize("return_pred", [True, False])
def test_every_trainable_parameter_gets_a_gradient(return_pred):
    m = small_model(norm_pix_loss=True)
    loss, _, _ = m(torch.randn(2, 3, 32, 32), return_pred=return_pred)
    loss.backward()
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "decoder_pos_embed"}
    for name, p in trainable.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert m.pos_embed.grad is None and m.decoder_pos_embed.grad is None


# ---- initialisation ----------------------------------------------------------------------------------------------
def _reference_sincos(dim: int, grid: int) -> np.ndarray:
    """The reference's 2-D sin-cos table, written independently in numpy: first half of the channels from the
    column index, second half from the row index; each half [sin(pos*w), cos(pos*w)], w_k = 1/10000^(k/(dim/4));
    a zero row for the class token first."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    table = np.zeros((1 + grid * grid, dim))
    for r in range(grid):
        for c in range(grid):
            row = 1 + r * grid + c
            table[row, 0:quarter] = np.sin(c * omega)
            table[row, quarter : 2 * quarter] = np.cos(c * omega)
            table[row, 2 * quarter : 3 * quarter] = np.sin(r * omega)
            table[row, 3 * quarter :] = np.cos(r * omega)
    return table.astype(np.float32)


def test_position_embeddings_are_frozen_reference_sincos():
    m = small_model()
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    np.testing.assert_allclose(m.pos_embed[0].numpy(), _reference_sincos(192, 4), atol=1e-6)
    np.testing.assert_allclose(m.decoder_pos_embed[0].numpy(), _reference_sincos(32, 4), atol=1e-6)
    assert m.pos_embed[0, 0].abs().sum() == 0  # class-token row is zero
    # ViT-B/16 at 224: a 14x14 grid, 768 channels
    from mae_service.model import sincos_2d

    np.testing.assert_allclose(sincos_2d(768, 14, cls_token=True).numpy(), _reference_sincos(768, 14), atol=1e-6)
    # an optimiser step leaves them unchanged
    before = m.pos_embed.clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m(torch.randn(2, 3, 32, 32))[0].backward()
    opt.step()
    assert torch.equal(m.pos_embed, before)


def test_reference_initialisation():
    torch.manual_seed(0)
    m = create_model("mae_vit_small_patch16", img_size=64, depth=2, decoder_depth=2)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            bound = math.sqrt(6.0 / (mod.in_features + mod.out_features))  # xavier uniform
            w = mod.weight
            assert w.abs().max() <= bound + 1e-7, name
            assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound, name
            assert torch.count_nonzero(mod.bias) == 0, name
        elif isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
            assert mod.eps == 1e-6, name
    w = m.patch_embed.proj.weight  # xavier on the [out, in*p*p] view
    bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))
    assert w.abs().max() <= bound + 1e-7 and abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    for tok in (m.cls_token, m.mask_token):
        assert abs(tok.std().item() - 0.02) < 0.006 and tok.abs().max() < 0.02 * 6


# ---- parity with Hugging Face ViTMAEForPreTraining -------------------------------------------------------------
def _hf_twin(m: MaskedAutoencoder, attn: str = "sdpa"):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hf = ViTMAEForPreTraining(ViTMAEConfig(**hf_config(m), attn_implementation=attn))
    hf.load_state_dict(to_hf_state_dict(m), strict=True)  # the same weights, HF's names
    return hf.eval()


def _compare(m, hf, imgs, noise, norm_pix):
    m.norm_pix_loss = norm_pix
    hf.config.norm_pix_loss = norm_pix
    with torch.no_grad():
        loss, pred, mask = m(imgs, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
        fast, _, _ = m(imgs, noise=noise, return_pred=False)
    assert torch.equal(mask, out.mask)
    assert abs(loss.item() - out.loss.item()) <= 1e-6
    assert (pred - out.logits).abs().max().item() <= 1e-5
    assert abs(fast.item() - out.loss.item()) <= 1e-6


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_parity_with_hf_tiny(attn):
    torch.manual_seed(1)
    m = create_model(
        "mae_vit_tiny_patch16", img_size=64, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4
    ).eval()
    hf = _hf_twin(m, attn)
    g = torch.Generator().manual_seed(2)
    imgs = torch.randn(2, 3, 64, 64, generator=g)
    noise = torch.rand(2, 16, generator=g)
    for norm_pix in (False, True):
        _compare(m, hf, imgs, noise, norm_pix)


def test_parity_with_hf_vit_base_224():
    torch.manual_seed(3)
    m = create_model("mae_vit_base_patch16").eval()
    hf = _hf_twin(m)
    g = torch.Generator().manual_seed(4)
    imgs = torch.randn(2, 3, 224, 224, generator=g)
    noise = torch.rand(2, 196, generator=g)
    for norm_pix in (False, True):
        _compare(m, hf, imgs, noise, norm_pix)
