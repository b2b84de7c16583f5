"""``train.amp``: what each mode resolves to on which device (the capability queries monkeypatched, never the
arithmetic), the errors for modes a device cannot run, and the driver refusing them before Ray starts."""

from __future__ import annotations

import pytest
import torch

from mae_service.config import AMP_MODES, ConfigError, build_config
from mae_service.model import precision
from mae_service.model.precision import amp_name, autocast, cpu_has_bf16, resolve_amp
from tests.tiny import TINY_LOCAL

NO_BF16 = {"architecture": "x86_64", "cpu_name": "Old CPU", "avx2": True, "avx512_f": True, "avx512_bf16": False}


@pytest.fixture
def cpu_caps(monkeypatch):
    """Set what ``torch.cpu.get_capabilities()`` reports."""

    def set_caps(caps):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)

    return set_caps


@pytest.fixture
def cuda(monkeypatch):
    """A CUDA device as torch's queries describe it (nothing runs on it)."""

    def set_cuda(bf16: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")

    return set_cuda


@pytest.mark.parametrize(
    "caps, has",
    [
        ({**NO_BF16, "avx512_bf16": True}, True),
        ({**NO_BF16, "amx_tile": True, "amx_bf16": True}, True),
        (NO_BF16, False),
        ({"architecture": "arm64", "neon": True}, False),
    ],
)
def test_cpu_bf16_comes_from_torchs_capability_query(cpu_caps, caps, has):
    cpu_caps(caps)
    assert cpu_has_bf16() is has
    assert resolve_amp("auto", "cpu") == (torch.bfloat16 if has else None)
    assert resolve_amp("none", "cpu") is None


def test_bf16_on_a_cpu_without_it_is_a_clear_error(cpu_caps):
    cpu_caps(NO_BF16)
    with pytest.raises(ValueError) as e:
        resolve_amp("bf16", "cpu")
    text = str(e.value)
    assert text.startswith("train.amp='bf16': this CPU (Old CPU) has no native bf16 arithmetic"), text
    assert "avx512_bf16 or amx_bf16" in text and text.endswith("allowed on this device: auto, none"), text
    cpu_caps({**NO_BF16, "avx512_bf16": True})
    assert resolve_amp("bf16", "cpu") == torch.bfloat16


def test_fp16_is_cuda_only_and_unknown_modes_are_named(cpu_caps, cuda):
    cpu_caps({**NO_BF16, "avx512_bf16": True})
    with pytest.raises(ValueError, match=r"train.amp='fp16': fp16 autocast runs on CUDA only.*auto, bf16, none$"):
        resolve_amp("fp16", "cpu")
    with pytest.raises(ValueError, match=r"^train.amp='fp8': allowed auto, bf16, fp16, none$"):
        resolve_amp("fp8", "cpu")
    cuda(bf16=False)
    assert resolve_amp("fp16", "cuda") == torch.float16
    assert resolve_amp("auto", "cuda") is None
    with pytest.raises(ValueError, match=r"cuda \(Old GPU\) has no native bf16.*allowed on this device: auto, fp16"):
        resolve_amp("bf16", "cuda")


def test_cuda_with_bf16(cuda):
    cuda(bf16=True)
    assert resolve_amp("auto", "cuda:0") == torch.bfloat16 and resolve_amp("bf16", "cuda") == torch.bfloat16


def test_config_and_precision_agree_on_the_modes():
    assert AMP_MODES == precision.AMP_MODES
    assert [amp_name(d) for d in (torch.bfloat16, torch.float16, None)] == ["bf16", "fp16", "fp32"]


def test_autocast_context():
    x = torch.randn(4, 8)
    w = torch.randn(3, 8)
    with autocast(None, "cpu"):
        assert torch.nn.functional.linear(x, w).dtype == torch.float32
    with autocast(torch.bfloat16, torch.device("cpu")):
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16


TINY = TINY_LOCAL


def _cfg(tmp_path, *extra):
    return build_config(
        {},
        [
            *TINY,
            f"data.train_uri={tmp_path / 'no-data'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"train.storage_path={tmp_path / 'ck'}",
            *extra,
        ],
    )


def test_driver_refuses_bf16_on_a_cpu_without_it_before_ray_starts(cpu_caps, tmp_path, monkeypatch):
    from mae_service.train import driver, trainer
    from mae_service.train.preflight import driver_amp

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for a run that cannot train")

    monkeypatch.setattr(trainer, "init_ray", no_ray)  # where the driver starts Ray (trainer.start_ray)
    cpu_caps(NO_BF16)
    with pytest.raises(ConfigError) as e:
        driver.pretrain(_cfg(tmp_path, "train.amp=bf16"))
    assert any(p.startswith("train.amp='bf16': this CPU (Old CPU) has no native bf16") for p in e.value.problems)
    assert any("no-data" in p for p in e.value.problems)  # named with every other problem, at once
    problems: list[str] = []
    assert driver_amp(_cfg(tmp_path), problems) == "fp32" and not problems
    cpu_caps({**NO_BF16, "avx512_bf16": True})
    assert (
        driver_amp(_cfg(tmp_path), problems) == "bf16"
        and driver_amp(_cfg(tmp_path, "train.amp=none"), problems) == "fp32"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver without a GPU: the workers decide
    assert driver_amp(_cfg(tmp_path, "train.amp=bf16", "train.use_gpu=true"), problems) is None
    assert not problems


def test_embeddings_and_pictures_compute_under_the_given_autocast():
    from mae_service.evaluation import embed
    from mae_service.model import create_model
    from mae_service.model.pictures import reconstruction_grid

    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, decoder_embed_dim=32, decoder_depth=1)
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    fp32, bf16 = embed(model, imgs), embed(model, imgs, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99
    assert torch.equal(fp32, embed(model, imgs, dtype=None))
    assert reconstruction_grid(model, imgs, dtype=torch.bfloat16).size == reconstruction_grid(model, imgs).size


def test_evaluation_refuses_an_unsupported_amp_before_any_lookup(cpu_caps):
    from mae_service.tracking.evaluations import evaluate_model

    cpu_caps(NO_BF16)
    with pytest.raises(ValueError, match=r"^train.amp='bf16': this CPU \(Old CPU\) has no native bf16"):
        evaluate_model("models:/nowhere@current", "/no/train", "/no/val", amp="bf16", tracking_uri="sqlite:///x.db")
