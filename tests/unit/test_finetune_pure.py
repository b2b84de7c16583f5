"""The fine-tuning classifier without Ray: layer-wise lr decay per block, what --blocks freezes, the encoder's
weights carried over, top-k counts, the config's cross-checks."""

from __future__ import annotations

import pytest
import torch

from mae_service.config import ConfigError, build_config
from mae_service.model import create_model
from mae_service.model.classifier import (
    classifier_architecture,
    create_classifier,
    layer_decay_groups,
    load_encoder_weights,
    set_group_lrs,
    topk_correct,
    trainable_names,
)


def _arch(blocks, depth=3):
    m = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=depth, decoder_embed_dim=32,
                     decoder_depth=1, decoder_num_heads=4)  # fmt: skip
    name, kw = m.timm_architecture()
    return m, classifier_architecture({"timm_name": name, "timm_kwargs": kw, "image_size": 32}, 5, blocks=blocks,
                                      drop_path=0.1)  # fmt: skip


def test_lr_of_each_block_follows_the_layer_decay():
    _, arch = _arch(None, depth=3)
    model = create_classifier(arch)
    opt = torch.optim.AdamW(layer_decay_groups(model, weight_decay=0.05, layer_decay=0.65))
    set_group_lrs(opt, 1e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    for i in range(3):  # layer i + 1 of depth + 2: scale 0.65 ** (depth + 1 - (i + 1))
        assert lr_of[id(named[f"blocks.{i}.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.65 ** (3 - i))
    assert lr_of[id(named["patch_embed.proj.weight"])] == pytest.approx(1e-3 * 0.65**4)
    assert lr_of[id(named["head.weight"])] == pytest.approx(1e-3)
    assert wd_of[id(named["head.weight"])] == 0.05 and wd_of[id(named["pos_embed"])] == 0.0
    assert wd_of[id(named["blocks.0.norm1.weight"])] == 0.0


@pytest.mark.parametrize("blocks", [0, 1, 3])
def test_blocks_freeze_all_but_the_last_k(blocks):
    mae, arch = _arch(blocks)
    model = create_classifier(arch)
    load_encoder_weights(model, mae.encoder_state_dict_timm())
    names = trainable_names(model)
    expected_blocks = {f"blocks.{i}." for i in range(3 - blocks, 3)}
    assert {n.split(".")[0] + "." + n.split(".")[1] + "." for n in names if n.startswith("blocks.")} == expected_blocks
    assert any(n.startswith("head") for n in names)
    assert any(n.startswith("fc_norm") for n in names) == (blocks > 0)
    assert not any(n.startswith(("patch_embed", "pos_embed", "cls_token")) for n in names)
    if blocks == 0:  # the linear probe: BatchNorm without affine on the pooled features, then the linear head
        assert isinstance(model.head[0], torch.nn.BatchNorm1d) and not model.head[0].affine
    # the encoder's weights were carried over (final norm → fc_norm)
    assert torch.equal(model.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    assert torch.equal(model.fc_norm.weight, mae.norm.weight)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_blocks_above_depth_and_topk():
    mae, _ = _arch(None)
    name, kw = mae.timm_architecture()
    with pytest.raises(ValueError, match="between 0 and the encoder's depth 3"):
        classifier_architecture({"timm_name": name, "timm_kwargs": kw, "image_size": 32}, 5, blocks=4, drop_path=0)
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15]])
    assert topk_correct(logits, torch.tensor([1, 2]), (1, 2, 5)) == [1, 2, 0]


def test_finetune_config_cross_checks():
    with pytest.raises(ConfigError, match="from_scratch=true with finetune.blocks=2"):
        build_config({}, ["finetune.from_scratch=true", "finetune.blocks=2"])
    with pytest.raises(ConfigError, match="must be even"):
        build_config({}, ["finetune.batch_size=6", "train.num_workers=2"])
    build_config({}, ["finetune.batch_size=6", "train.num_workers=2", "finetune.mixup=0", "finetune.cutmix=0"])
    with pytest.raises(ConfigError, match="finetune.layer_decay=1.5: must be in"):
        build_config({}, ["finetune.layer_decay=1.5"])


def test_report_rows_are_in_table_order_and_never_take_the_users_alias():
    from mae_service.finetune.table import row_configs

    base = build_config({"finetune": {"alias": "current", "epochs": 3}}).finetune
    rows = row_configs(base, depth=4, partial_blocks=(1, 2, 9), stamp="S")
    assert [p for p, _ in rows] == ["linear", "partial1", "partial2", "finetune", "scratch"]  # 9 > depth: left out
    assert [(ft.blocks, ft.from_scratch) for _, ft in rows] == [
        (0, False),
        (1, False),
        (2, False),
        (None, False),
        (None, True),
    ]
    aliases = [ft.alias for _, ft in rows]
    assert "current" not in aliases and len(set(aliases)) == len(rows)
    assert all(ft.epochs == 3 and ft.run_name == f"report-S-{p}" for p, ft in rows)
