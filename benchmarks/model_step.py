"""One MAE training step (forward + backward + AdamW), images/s: this project's model vs HF ViTMAEForPreTraining.

Both models get the same weights (ours copied into HF's names), the same config and the same batch; the variants
are timed interleaved (round-robin) in one process so that machine load hits them alike, and a large fp32 matmul is
timed in every round for the machine's GEMM rate. Reported per config:

- images/s (median over rounds) of every variant and its ratio to HF;
- efficiency = (counted FLOPs of one step ÷ step time) ÷ measured GEMM FLOP/s. The FLOPs are those of the
  project's step (the work the loss needs: matmuls, convolution, attention; counted with torch's FlopCounterMode,
  attention through its matmul form), the same number for every variant, so the efficiencies compare like ratios.

Before timing, the loss of every variant is checked against HF's for the same noise (|Δ| ≤ 1e-5; eager ≤ 1e-6).

Run: ``.venv/bin/python benchmarks/model_step.py [--quick] [--compile]`` (wrap it in ``flock /tmp/mae_heavy.lock``
on a shared machine). ``--quick`` is a tiny smoke run (seconds); ``--compile`` adds the project's model under
``torch.compile`` (about two minutes of compilation per config on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mae_service.model import create_model  # noqa: E402
from mae_service.model.export import hf_config, to_hf_state_dict  # noqa: E402

CONFIGS = {  # label: (model name, overrides, batch)
    "ViT-B/16 224 b8": ("mae_vit_base_patch16", {}, 8),
    "ViT-S/16 224 b16": ("mae_vit_small_patch16", {}, 16),
}
QUICK = {"tiny 64 b8 (smoke)": ("mae_vit_tiny_patch16", dict(img_size=64, decoder_depth=2), 8)}


def gemm_flops_per_s(n: int = 3072, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def step_flops(model, imgs: torch.Tensor) -> int:
    """FLOPs of forward + backward of the project's training step (attention counted in its matmul form)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _, _ = model(imgs, return_pred=False)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def make_variants(name: str, overrides: dict, imgs: torch.Tensor, compile_: bool) -> dict[str, Callable]:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    ours = create_model(name, norm_pix_loss=True, **overrides)
    hf_cfg = ViTMAEConfig(**hf_config(ours), attn_implementation="sdpa")
    hf = ViTMAEForPreTraining(hf_cfg)
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    hf_fused = ViTMAEForPreTraining(hf_cfg)
    hf_fused.load_state_dict(to_hf_state_dict(ours), strict=True)

    def trainable(m):
        return [p for p in m.parameters() if p.requires_grad]

    # numerics: the same loss for the same noise
    noise = torch.rand(imgs.shape[0], ours.num_patches)
    with torch.no_grad():
        ref = hf(pixel_values=imgs, noise=noise).loss.item()
        got = ours(imgs, noise=noise, return_pred=False)[0].item()
    assert abs(ref - got) <= 1e-6, f"loss differs from HF: {got} vs {ref}"

    def hf_step(model, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            model(pixel_values=imgs).loss.backward()
            opt.step()

        return step

    def ours_step(fn, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            fn(imgs, return_pred=False)[0].backward()  # prediction head on removed patches only
            opt.step()

        return step

    variants = {
        "hf (AdamW default)": hf_step(hf, torch.optim.AdamW(trainable(hf), lr=1e-4)),
        "hf + fused AdamW": hf_step(hf_fused, torch.optim.AdamW(trainable(hf_fused), lr=1e-4, fused=True)),
        "ours (eager, fused AdamW)": ours_step(ours, torch.optim.AdamW(trainable(ours), lr=1e-4, fused=True)),
    }
    if compile_:
        torch._inductor.config.fallback_random = True  # same masks as eager for the same seed
        torch.manual_seed(0)
        twin = create_model(name, norm_pix_loss=True, **overrides)
        twin.load_state_dict(ours.state_dict())
        compiled = torch.compile(twin)
        with torch.no_grad():
            got_c = compiled(imgs, noise=noise, return_pred=False)[0].item()
        assert abs(ref - got_c) <= 1e-5, f"compiled loss differs from HF: {got_c} vs {ref}"
        variants["ours (torch.compile, fused AdamW)"] = ours_step(
            compiled, torch.optim.AdamW(trainable(twin), lr=1e-4, fused=True)
        )
    variants["_flops"] = step_flops(ours, imgs)  # type: ignore[assignment]
    return variants


def run_config(label: str, name: str, overrides: dict, batch: int, rounds: int, warmup: int, compile_: bool):
    torch.manual_seed(1)
    size = overrides.get("img_size", 224)
    imgs = torch.randn(batch, 3, size, size)
    variants = make_variants(name, overrides, imgs, compile_)
    flops = variants.pop("_flops")
    for key, step in variants.items():
        t = time.perf_counter()
        for _ in range(warmup):
            step()
        print(f"  warm-up {key}: {time.perf_counter() - t:.1f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    gemm: list[float] = []
    for _ in range(rounds):
        gemm.append(gemm_flops_per_s())
        for key, step in variants.items():
            t = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t)
    peak = statistics.median(gemm)
    hf_ips = batch / statistics.median(times["hf (AdamW default)"])
    print(
        f"\n{label}: {flops / batch / 1e9:.1f} GFLOP/image per step, fp32 GEMM {peak / 1e9:.0f} GFLOP/s "
        f"(median of {rounds}, range {min(gemm) / 1e9:.0f}–{max(gemm) / 1e9:.0f}), torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"  {'variant':38s} {'img/s':>7s} {'× hf':>6s} {'eff.':>6s}   per-round img/s")
    rows = []
    for key, ts in times.items():
        ips = batch / statistics.median(ts)
        eff = flops / statistics.median(ts) / peak
        rows.append((key, ips, ips / hf_ips, eff))
        per = ", ".join(f"{batch / t:.2f}" for t in ts)
        print(f"  {key:38s} {ips:7.2f} {ips / hf_ips:6.2f} {eff:6.2f}   {per}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny config, 2 rounds: a smoke run")
    ap.add_argument("--compile", action="store_true", help="also time the model under torch.compile")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--only", choices=["b16", "s16"], help="run one config only")
    args = ap.parse_args(argv)
    configs = QUICK if args.quick else CONFIGS
    if args.only:
        configs = {k: v for k, v in configs.items() if k.lower().replace("/", "").startswith("vit-" + args.only)}
    rounds = args.rounds or (2 if args.quick else 4)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads; "
        f"{rounds} interleaved rounds per config"
    )
    for label, (name, overrides, batch) in configs.items():
        print(f"\n== {label} ({name} {overrides or ''}, norm_pix_loss, mask ratio 0.75)", flush=True)
        run_config(label, name, overrides, batch, rounds, warmup=1 if args.quick else 2, compile_=args.compile)
        gc.collect()
        torch._dynamo.reset()  # drop compiled graphs before the next config
    return 0


if __name__ == "__main__":
    sys.exit(main())
