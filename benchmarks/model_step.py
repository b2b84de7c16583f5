"""One MAE training step (forward + backward + AdamW), images/s, fp32 and bf16: this project's model vs HF ViTMAE.

Both models get the same weights (ours copied into HF's names), the same config and the same batch; every variant
uses fused AdamW. Variants: each model in fp32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the
same context for both: :func:`mae_service.model.precision.autocast`, what ``train.amp=bf16`` runs), and the
project's model under ``torch.compile`` in bf16. They are timed interleaved (round-robin) in one process so that
machine load hits them alike, and a large fp32 and a large bf16 matmul are timed in every round for the machine's
GEMM rate of each dtype. Reported per config:

- images/s (median over rounds) of every variant, its ratio to the same model's fp32 step and to HF's step in the
  same dtype;
- efficiency = (counted FLOPs of one step ÷ step time) ÷ measured GEMM FLOP/s *of the variant's dtype* (bf16 GEMM
  for bf16 variants). The FLOPs are those of the project's step (the work the loss needs: matmuls, convolution,
  attention; counted with torch's FlopCounterMode, attention through its matmul form), the same number for every
  variant, so the efficiencies compare like ratios.

Before timing, the losses for the same noise are checked: ours against HF's in fp32 (|Δ| ≤ 1e-6) and in bf16
(|Δ| ≤ 1 % of the loss: both compute in bf16, in different op orders), ours in bf16 against ours in fp32 (≤ 2 %),
compiled bf16 against eager bf16 (≤ 1 %).

Run: ``.venv/bin/python benchmarks/model_step.py [--quick] [--no-compile] [--only b16|s16]`` (wrap it in
``flock /tmp/mae_heavy.lock`` on a shared machine). ``--quick`` is a tiny smoke run (under a minute, most of it
compiling); ``--no-compile`` drops the compiled variant (about two minutes of compilation per config on 2 cores).
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
from mae_service.model.precision import autocast, cpu_has_bf16  # noqa: E402

CONFIGS = {  # label: (model name, overrides, batch)
    "ViT-B/16 224 b8": ("mae_vit_base_patch16", {}, 8),
    "ViT-S/16 224 b16": ("mae_vit_small_patch16", {}, 16),
}
QUICK = {"tiny 64 b8 (smoke)": ("mae_vit_tiny_patch16", dict(img_size=64, decoder_depth=2), 8)}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def gemm_flops_per_s(dtype: torch.dtype, n: int = 3072, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
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


def _adamw(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)


def _timed(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, dtype: torch.dtype | None) -> Callable:
    """One optimiser step: forward under ``dtype``'s autocast (None: fp32), backward, fused AdamW."""

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(dtype, "cpu"):
            loss = loss_fn()
        loss.backward()
        opt.step()

    return step


def _check_losses(ours, hf, compiled, imgs: torch.Tensor) -> None:
    """The numerics checks of the module docstring, for the same noise."""
    noise = torch.rand(imgs.shape[0], ours.num_patches)
    got: dict[str, float] = {}
    with torch.no_grad():
        for dt, dtype in DTYPES.items():
            with autocast(dtype, "cpu"):
                got[f"hf {dt}"] = hf(pixel_values=imgs, noise=noise).loss.item()
                got[f"ours {dt}"] = ours(imgs, noise=noise, return_pred=False)[0].item()
                if compiled is not None and dtype is not None:
                    got[f"compiled {dt}"] = compiled(imgs, noise=noise, return_pred=False)[0].item()
    ref = got["ours fp32"]
    limits = [("hf fp32", "ours fp32", 1e-6), ("hf bf16", "ours bf16", 0.01 * ref), ("ours fp32", "ours bf16", 0.02)]
    limits += [("ours bf16", "compiled bf16", 0.01 * ref)] if compiled is not None else []
    for a, b, tol in limits:
        assert abs(got[a] - got[b]) <= tol, f"loss {b} {got[b]} vs {a} {got[a]} (|Δ| > {tol:.2g})"
    print("  losses, same noise: " + ", ".join(f"{k} {v:.6f}" for k, v in got.items()))


def make_variants(name: str, overrides: dict, imgs: torch.Tensor, compile_: bool) -> dict[str, tuple[str, Callable]]:
    """``{label: (dtype name, step)}``, after the numerics checks."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    ours = create_model(name, norm_pix_loss=True, **overrides)
    hf = ViTMAEForPreTraining(ViTMAEConfig(**hf_config(ours), attn_implementation="sdpa"))
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    compiled = None
    if compile_:
        torch._inductor.config.fallback_random = True  # same masks as eager for the same seed
        compiled = torch.compile(ours)
    _check_losses(ours, hf, compiled, imgs)
    opt_hf, opt_ours = _adamw(hf), _adamw(ours)  # the compiled variant steps ours' parameters

    def hf_loss():
        return hf(pixel_values=imgs).loss

    def ours_loss(fn=ours):
        return fn(imgs, return_pred=False)[0]  # the prediction head on removed patches only

    variants: dict[str, tuple[str, Callable]] = {}
    for dt, dtype in DTYPES.items():
        variants[f"hf {dt}"] = (dt, _timed(hf_loss, opt_hf, dtype))
        variants[f"ours {dt}"] = (dt, _timed(ours_loss, opt_ours, dtype))
    if compiled is not None:
        variants["ours bf16, torch.compile"] = ("bf16", _timed(lambda: ours_loss(compiled), opt_ours, torch.bfloat16))
    return variants


def _time_rounds(variants: dict[str, tuple[str, Callable]], rounds: int, warmup: int):
    """``(step seconds per variant, GEMM FLOP/s per dtype)``, one sample of each per round."""
    for key, (_, step) in variants.items():
        t = time.perf_counter()
        for _ in range(warmup):
            step()
        print(f"  warm-up {key}: {time.perf_counter() - t:.1f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    gemm: dict[str, list[float]] = {dt: [] for dt in DTYPES}
    for _ in range(rounds):
        for dt, dtype in DTYPES.items():
            gemm[dt].append(gemm_flops_per_s(dtype or torch.float32))
        for key, (_, step) in variants.items():
            t = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t)
    return times, gemm


def run_config(label: str, name: str, overrides: dict, batch: int, rounds: int, warmup: int, compile_: bool):
    torch.manual_seed(1)
    size = overrides.get("img_size", 224)
    imgs = torch.randn(batch, 3, size, size)
    variants = make_variants(name, overrides, imgs, compile_)
    flops = step_flops(create_model(name, norm_pix_loss=True, **overrides), imgs)
    times, gemm = _time_rounds(variants, rounds, warmup)
    peak = {dt: statistics.median(v) for dt, v in gemm.items()}
    ips = {k: batch / statistics.median(ts) for k, ts in times.items()}
    rates = ", ".join(
        f"{dt} GEMM {peak[dt] / 1e9:.0f} GFLOP/s ({min(v) / 1e9:.0f}–{max(v) / 1e9:.0f})" for dt, v in gemm.items()
    )
    print(
        f"\n{label}: {flops / batch / 1e9:.1f} GFLOP/image per step; {rates}, median of {rounds}; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"  {'variant':28s} {'img/s':>7s} {'× fp32':>7s} {'× hf':>6s} {'eff.':>6s}   per-round img/s")
    rows = []
    for key, (dt, _) in variants.items():
        model = key.split()[0]
        eff = flops / statistics.median(times[key]) / peak[dt]
        x_fp32, x_hf = ips[key] / ips[f"{model} fp32"], ips[key] / ips[f"hf {dt}"]
        rows.append((key, ips[key], x_fp32, x_hf, eff))
        per = ", ".join(f"{batch / t:.2f}" for t in times[key])
        print(f"  {key:28s} {ips[key]:7.2f} {x_fp32:7.2f} {x_hf:6.2f} {eff:6.2f}   {per}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny config, 2 rounds: a smoke run")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--only", choices=["b16", "s16"], help="run one config only")
    args = ap.parse_args(argv)
    configs = QUICK if args.quick else CONFIGS
    if args.only:
        configs = {k: v for k, v in configs.items() if k.lower().replace("/", "").startswith("vit-" + args.only)}
    rounds = args.rounds or (2 if args.quick else 4)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_bf16()}; {rounds} interleaved rounds"
    )
    for label, (name, overrides, batch) in configs.items():
        print(f"\n== {label} ({name} {overrides or ''}, norm_pix_loss, mask ratio 0.75)", flush=True)
        run_config(label, name, overrides, batch, rounds, warmup=1 if args.quick else 2, compile_=not args.no_compile)
        gc.collect()
        torch._dynamo.reset()  # drop compiled graphs before the next config
    return 0


if __name__ == "__main__":
    sys.exit(main())
