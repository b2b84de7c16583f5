"""k-NN and linear probe on synthetic features; embeddings of MAE vs the exported timm encoder; the pyfunc;
the evaluation package's import rules."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_service.evaluation import knn_top1, linear_probe
from mae_service.evaluation.features import embed, extract_features, extract_labelled_features
from mae_service.model import IMAGENET_MEAN, IMAGENET_STD, create_model
from mae_service.model.export import to_timm_encoder


def _clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def _tiny_mae(**kw):
    torch.manual_seed(0)
    return create_model(
        "mae_vit_tiny_patch16", img_size=32, depth=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, **kw
    )


# ---- kNN ----------------------------------------------------------------------------------------------------
def test_knn_separable_clusters_are_perfect_and_noise_is_chance():
    xt, yt = _clusters(40, 4, 16, 0.1, seed=0)
    xv, yv = _clusters(10, 4, 16, 0.1, seed=0)
    assert knn_top1(xt, yt, xv, yv) == 1.0
    g = torch.Generator().manual_seed(1)
    acc = knn_top1(
        torch.randn(400, 16, generator=g),
        torch.randint(0, 4, (400,), generator=g),
        torch.randn(400, 16, generator=g),
        torch.randint(0, 4, (400,), generator=g),
    )
    assert 0.1 < acc < 0.45


def test_knn_matches_a_hand_computed_weighted_vote():
    # train points on the unit circle; one query; k=3 neighbours with exp(cos/T) weights
    angles = torch.tensor([0.0, 0.3, 0.5, 3.0])
    xt = torch.stack([angles.cos(), angles.sin()], 1)
    yt = torch.tensor([0, 1, 1, 0])
    xv = torch.tensor([[1.0, 0.0]])
    # neighbours: angle 0 (class 0, cos 1), 0.3 (class 1), 0.5 (class 1)
    w = lambda a: float(np.exp(np.cos(a) / 0.5))  # noqa: E731
    class0, class1 = w(0.0), w(0.3) + w(0.5)
    expected = 0 if class0 > class1 else 1
    assert knn_top1(xt, yt, xv, torch.tensor([expected]), k=3, temperature=0.5) == 1.0
    assert knn_top1(xt, yt, xv, torch.tensor([1 - expected]), k=3, temperature=0.5) == 0.0
    # with k=1 only the nearest (class 0) votes
    assert knn_top1(xt, yt, xv, torch.tensor([0]), k=1) == 1.0


def test_knn_is_scale_invariant_chunk_invariant_and_accepts_numpy():
    xt, yt = _clusters(30, 5, 8, 2.0, seed=2)
    xv, yv = _clusters(20, 5, 8, 2.0, seed=3)
    a = knn_top1(xt, yt, xv, yv, k=7)
    assert a == knn_top1(xt * 10, yt, xv * 0.1, yv, k=7)  # L2-normalised
    assert a == knn_top1(xt, yt, xv, yv, k=7, chunk_size=3)
    assert a == knn_top1(xt.numpy(), yt.numpy(), xv.numpy(), yv.numpy(), k=7)
    assert knn_top1(xt, yt, xv, yv, k=10_000) == knn_top1(xt, yt, xv, yv, k=len(xt))  # k clipped


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k=0"),
        (dict(temperature=0.0), "temperature"),
        (dict(val_feats=torch.zeros(3, 5)), "features per row"),
        (dict(train_labels=torch.zeros(7, dtype=torch.long)), "labels"),
        (dict(train_feats=torch.zeros(0, 4)), "non-empty"),
        (dict(val_labels=torch.tensor([0, -1, 0])), "≥ 0"),
        (dict(train_feats=torch.full((6, 4), float("nan"))), "non-finite"),
    ],
)
def test_knn_bad_input_names_the_problem(kwargs, match):
    args = dict(
        train_feats=torch.randn(6, 4),
        train_labels=torch.zeros(6, dtype=torch.long),
        val_feats=torch.randn(3, 4),
        val_labels=torch.zeros(3, dtype=torch.long),
    )
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in args}
    with pytest.raises(ValueError, match=match):
        knn_top1(**{**args, **extra}, **kwargs)


# ---- linear probe ---------------------------------------------------------------------------------------------
def test_linear_probe_learns_separable_classes_and_is_deterministic():
    xt, yt = _clusters(50, 3, 12, 1.0, seed=4)
    xv, yv = _clusters(20, 3, 12, 1.0, seed=4)
    acc = linear_probe(xt, yt, xv, yv, epochs=30)
    assert acc > 0.95
    assert acc == linear_probe(xt, yt, xv, yv, epochs=30)
    # shuffled labels carry no signal
    perm = torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))
    assert linear_probe(xt, yt[perm], xv, yv, epochs=30) < 0.7


def test_linear_probe_bad_input():
    x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(x, y, x, y, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        linear_probe(x, y, x, y, lr=-1.0)


# ---- features -------------------------------------------------------------------------------------------------
def test_embed_of_mae_equals_the_exported_timm_encoder_and_restores_mode():
    model = _tiny_mae().train()
    encoder = to_timm_encoder(model)
    imgs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    a, b = embed(model, imgs), embed(encoder, imgs)
    assert a.shape == (5, 192) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert model.training  # restored
    # a different image gives a different embedding (the encoder is not constant)
    assert not torch.allclose(a[0], embed(model, imgs[1:2])[0])


@pytest.mark.parametrize("pool", [{"global_pool": "token"}, {"global_pool": "avg", "fc_norm": False}])
def test_embed_follows_the_timm_architectures_pooling(pool, monkeypatch):
    model = _tiny_mae()
    name, kwargs = model.timm_architecture()
    monkeypatch.setattr(model, "timm_architecture", lambda: (name, {**kwargs, **pool}))
    encoder = to_timm_encoder(model)  # built from the patched architecture: timm pools as configured
    imgs = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(embed(model, imgs), embed(encoder, imgs), rtol=1e-5, atol=1e-5)


def test_embed_resizes_other_sizes_and_rejects_float_input():
    model = _tiny_mae()
    imgs = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    small = torch.nn.functional.interpolate(imgs.float(), size=(32, 32), mode="bilinear", antialias=True)
    assert embed(model, imgs).shape == (2, 192)
    with pytest.raises(ValueError, match="uint8"):
        embed(model, small)


def test_extract_features_splits_batches_and_keeps_order():
    model = _tiny_mae()
    imgs = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    whole = embed(model, imgs)
    parts = extract_features(model, [imgs[:3].numpy(), imgs[3:]], batch_size=2)
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-5)
    feats, labels = extract_labelled_features(
        model, [{"image": imgs[:4], "label": np.arange(4)}, {"image": imgs[4:].numpy(), "label": np.arange(4, 7)}]
    )
    torch.testing.assert_close(feats, whole, rtol=1e-5, atol=1e-5)
    assert labels.tolist() == list(range(7))
    with pytest.raises(ValueError, match="no images"):
        extract_features(model, [])


def test_knn_on_embeddings_of_colour_classes_is_perfect():
    # two classes that differ in colour: even a random encoder separates them
    g = torch.Generator().manual_seed(0)

    def batch(n):
        labels = torch.arange(n) % 2
        base = torch.where(
            labels[:, None, None, None] == 0,
            torch.tensor([200, 30, 30]).view(1, 3, 1, 1),
            torch.tensor([30, 30, 200]).view(1, 3, 1, 1),
        )
        noise = torch.randint(-20, 21, (n, 3, 32, 32), generator=g)
        return {"image": (base + noise).clamp(0, 255).to(torch.uint8), "label": labels}

    model = _tiny_mae()
    xt, yt = extract_labelled_features(model, [batch(20)])
    xv, yv = extract_labelled_features(model, [batch(10)])
    assert knn_top1(xt, yt, xv, yv, k=5) == 1.0


# ---- the pyfunc file is self-contained and agrees with the package ---------------------------------------------
def _load_pyfunc_module():
    path = Path(__file__).resolve().parents[2] / "mae_service" / "tracking" / "encoder_pyfunc.py"
    spec = importlib.util.spec_from_file_location("encoder_pyfunc_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


def test_pyfunc_file_imports_nothing_from_the_package_and_matches_constants():
    mod, path = _load_pyfunc_module()
    text = path.read_text()
    assert "mae_service" not in "\n".join(line for line in text.splitlines() if line.startswith(("import", "from")))
    from mae_service.tracking import artifacts

    assert mod.FORMAT == artifacts.FORMAT
    assert mod.sha256_file(path) == artifacts.sha256_file(path)
    sys.modules.pop("encoder_pyfunc_under_test", None)


def test_pyfunc_predict_equals_package_embeddings(tmp_path):
    """The serving code path (load_context + predict) computes what mae_service.evaluation.embed computes."""
    import json

    from safetensors.torch import save_file

    from mae_service.tracking.artifacts import stage_files

    model = _tiny_mae()
    stage_files(model, tmp_path)
    mod, _ = _load_pyfunc_module()

    class Ctx:
        artifacts = {
            "weights": str(tmp_path / "encoder.safetensors"),
            "architecture": str(tmp_path / "architecture.json"),
        }

    pf = mod.EncoderModel()
    pf.load_context(Ctx)
    assert json.loads((tmp_path / "architecture.json").read_text())["mean"] == list(IMAGENET_MEAN)
    assert pf.std.flatten().tolist() == pytest.approx(list(IMAGENET_STD))
    imgs = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    out = pf.predict(None, imgs.numpy())
    assert out.dtype == np.float32 and out.shape == (3, 192)
    np.testing.assert_allclose(out, embed(model, imgs).numpy(), rtol=1e-5, atol=1e-5)
    big = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    np.testing.assert_allclose(pf.predict(None, big.numpy()), embed(model, big).numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        pf.predict(None, imgs.float().numpy())
    # a corrupted weights file is refused at load
    save_file({"x": torch.zeros(1)}, str(tmp_path / "encoder.safetensors"))
    with pytest.raises(ValueError, match="sha256"):
        mod.EncoderModel().load_context(Ctx)


# ---- layering ---------------------------------------------------------------------------------------------------
def test_evaluation_package_is_lazy_and_imports_nothing_above_it():
    """``import mae_service.evaluation`` loads no torch; its modules load no MLflow and no tracking/train/tune."""
    script = (
        "import sys\n"
        "import mae_service.evaluation as ev\n"
        "assert 'torch' not in sys.modules, 'torch imported eagerly'\n"
        "import mae_service.evaluation.features, mae_service.evaluation.knn, mae_service.evaluation.probes\n"
        "assert ev.knn_metrics is mae_service.evaluation.knn.knn_metrics\n"
        "above = [m for m in sys.modules if m == 'mlflow' or m.startswith(('mae_service.tracking', "
        "'mae_service.train', 'mae_service.tune'))]\n"
        "assert not above, above\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_staged_files_are_byte_identical_from_one_save_to_the_next(tmp_path):
    """The registry checks and compares checksums: the same weights must give the same files every time (a
    resubmit's registration reuses a version only when they do)."""
    from mae_service.tracking.artifacts import stage_files

    model = _tiny_mae()
    shas = set()
    for i in range(12):
        (tmp_path / str(i)).mkdir()
        shas.add(tuple(sorted(stage_files(model, tmp_path / str(i)).items())))
    assert len(shas) == 1
