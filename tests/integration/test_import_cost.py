"""Configuration and model presets load without torch, Ray or MLflow (fast CLI start, light config checks)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import mae_service.model.presets
import mae_service.config as c
cfg = c.build_config({}, ["model.name=mae_vit_tiny_patch16", "data.image_size=64", "model.patch_size=8"])
c.load_config("jobs/configs/demo.yaml").to_yaml()
cfg.resume_conflicts(cfg.to_dict()); cfg.digest()
import mae_service.model
assert mae_service.model.MODEL_NAMES and mae_service.model.preset("mae_vit_tiny_patch16")
print(json.dumps(sorted(m for m in ("torch", "timm", "ray", "mlflow") if m in sys.modules)))
"""


def test_config_and_presets_import_no_heavy_packages():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_model_package_still_exports_the_torch_names():
    probe = (
        "import sys, mae_service.model as m; assert 'torch' not in sys.modules; "
        "print(m.create_model('mae_vit_tiny_patch16', img_size=32).__class__.__name__, m.IMAGENET_MEAN, "
        "m.OVERRIDE_KEYS[0], m.sincos_2d.__name__, m.normalize.__name__, m.MaskedAutoencoder.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MaskedAutoencoder (0.485, 0.456, 0.406) decoder_depth sincos_2d normalize")
