"""Self-attention for the project's ViTs: timm's ``Attention`` (same parameters, same names, same results in
fp32), with one change for training on CPUs under bf16 autocast.

Measured on 2 cores (Intel Xeon with AMX, torch 2.14.1, fwd + bwd of ``F.scaled_dot_product_attention``):
the fused CPU kernel's bf16 backward is slower than its fp32 one — 59 vs 43 ms at the decoder's shape
(16 × 16 heads × 197 tokens × 32) and 8.2 vs 2.1 ms at ViT-S's encoder shape (16 × 6 × 50 × 64) — and it took a
third of a bf16 ViT-S MAE step. So where gradients are wanted on a CPU under bf16 autocast, the attention kernel
runs on fp32 copies of q, k, v (a few MB) and its output goes back to bf16 for the projection; the projections, the
MLP and everything else stay in bf16. Inference, CUDA and fp32 runs take timm's own path unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import Tensor


def _fp32_kernel_wanted(x: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


class Attention(TimmAttention):
    """timm's ``Attention``; on CPU under bf16 autocast with gradients, the attention kernel runs in fp32."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if not (self.fused_attn and _fp32_kernel_wanted(x)):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(
                q.float(),
                k.float(),
                v.float(),
                attn_mask=attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.float(),
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
            ).to(qkv.dtype)
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))
