"""The MAE training step on one CUDA GPU: img/s and MFU for ViT-B/16, ViT-L/16 and ViT-H/14 (torch + timm + this
package's model; no Ray, no MLflow).

    .venv/bin/python benchmarks/gpu_step.py --json out.json                # on a CUDA machine (~4-5 min on an H100)
    .venv/bin/python benchmarks/gpu_step.py --smoke                        # anywhere: tiny model, 2 steps, CPU ok

The step is the trainer's: ``model(imgs, return_pred=False)`` under bf16 autocast (``mae_service.model.precision``),
timm's fused attention (``F.scaled_dot_product_attention``: flash attention on CUDA), backward, ``AdamW(fused=True)``,
the model under ``torch.compile`` (and eager, for comparison). Images 224², mask ratio 0.75, ``norm_pix_loss``,
the preset's decoder (512 wide, 8 blocks). Per model: FLOPs of one step counted by ``torch.utils.flop_counter``
(attention in its matmul form), then ``--steps`` timed steps after warm-up (which includes compilation).

**MFU** = counted FLOPs × img/s ÷ the bf16 GEMM rate measured on the same card (8192² matmuls), not the datasheet's
peak: it says how much of what the card's matmuls reach the step gets. Without CUDA (and without ``--smoke``) it
exits 2 saying so. ``--deadline-s`` skips models that would start after it (recorded as skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {  # name → (preset, patch, per-GPU batch)
    "vit_b16": ("mae_vit_base_patch16", 16, 256),
    "vit_l16": ("mae_vit_large_patch16", 16, 128),
    "vit_h14": ("mae_vit_huge_patch14", 14, 64),
}
SMOKE = {"tiny": ("mae_vit_tiny_patch16", 8, 4)}


def gemm_rate(device, dtype, n: int, reps: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(model, imgs) -> int:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16):
            loss, _, _ = model(imgs, return_pred=False)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_model(
    key: str, preset: str, patch: int, batch: int, *, device, steps: int, warmup: int, compile_: bool, size: int
):
    import torch

    from mae_service.model import create_model, normalize
    from mae_service.model.precision import autocast

    torch.manual_seed(0)
    model = create_model(preset, img_size=size, patch_size=patch, norm_pix_loss=True).to(device)
    imgs = normalize(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device))
    flops_per_img = step_flops(model, imgs[:2]) / 2
    out = {"preset": preset, "patch": patch, "batch": batch, "gflop_per_img": round(flops_per_img / 1e9, 2)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    variants = [("eager", model)] + ([("compiled", torch.compile(model))] if compile_ else [])
    for name, m in variants:

        def step(m=m):
            opt.zero_grad(set_to_none=True)
            with autocast(torch.bfloat16, device):
                loss, _, _ = m(imgs, return_pred=False)
            loss.backward()
            opt.step()
            return loss

        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(device)
        warm_s = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        out[name] = {
            "img_per_s": round(batch / dt, 1),
            "step_ms": round(1000 * dt, 2),
            "warmup_s": round(warm_s, 1),
            "loss": round(float(loss), 4),
        }
    if device.type == "cuda":
        out["max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        torch.cuda.reset_peak_memory_stats()
    return out, flops_per_img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps, any device (checks the script)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--deadline-s", type=float, default=300.0, help="start no model after this many seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "gpu_step.py: no CUDA device (torch.cuda.is_available() is False); use --smoke to check the script on CPU"
        )
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    models = SMOKE if args.smoke else {k: MODELS[k] for k in args.models.split(",")}
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    size = 32 if args.smoke else 224
    gemm = gemm_rate(device, torch.bfloat16, 512 if args.smoke else 8192, 5 if args.smoke else 50)
    result: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
        "bf16_gemm_tflops": round(gemm / 1e12, 1 if cuda else 4),
        "models": {},
    }
    for key, (preset, patch, batch) in models.items():
        if time.perf_counter() - t_start > args.deadline_s:
            result["models"][key] = {"skipped": f"past --deadline-s={args.deadline_s:g}"}
            continue
        try:
            out, flops = time_model(
                key,
                preset,
                patch,
                batch,
                device=device,
                steps=steps,
                warmup=warmup,
                compile_=not args.no_compile and not args.smoke,
                size=size,
            )
        except torch.OutOfMemoryError as e:
            result["models"][key] = {"error": f"out of memory at batch {batch}: {str(e)[:200]}"}
            torch.cuda.empty_cache()
            continue
        for v in ("eager", "compiled"):
            if v in out:
                out[v]["mfu"] = round(flops * out[v]["img_per_s"] / gemm, 3)
        result["models"][key] = out
        print(json.dumps({key: out}), flush=True)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
