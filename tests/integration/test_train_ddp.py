"""optimizer_step across two real DDP ranks (gloo, two processes on 127.0.0.1, no Ray): a non-finite loss on one
rank makes both ranks skip the update together, without a hang, and the ranks stay identical; the step's single
all-reduce adds the callers' numbers over the ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mae_service.config import build_config
from mae_service.train.schedule import make_optimizer
from mae_service.train.step import build_model, optimizer_step
from tests.servers import free_port
from tests.unit.test_train_pure import TINY


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        cfg = build_config({}, [*TINY, "train.num_workers=2"])
        torch.manual_seed(0)
        core = build_model(cfg)
        ddp = torch.nn.parallel.DistributedDataParallel(core)
        opt = make_optimizer(core, lr=1e-3, weight_decay=0.05)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        g = torch.Generator().manual_seed(rank)
        imgs = [torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(2)]
        cpu = torch.device("cpu")
        results = [
            optimizer_step(
                ddp, core, opt, scaler, imgs, cfg=cfg, device=cpu, rank=rank, step=0, sums=(float(rank + 1), 0.5)
            )
        ]
        after_good = {k: v.clone() for k, v in core.state_dict().items()}
        # step 1: only rank 1's loss is non-finite (its prediction head outputs NaN)
        if rank == 1:
            handle = core.decoder_pred.register_forward_hook(lambda m, i, o: o * float("nan"))
        results.append(optimizer_step(ddp, core, opt, scaler, imgs, cfg=cfg, device=cpu, rank=rank, step=1))
        if rank == 1:
            handle.remove()
        unchanged = all(torch.equal(v, after_good[k]) for k, v in core.state_dict().items())
        grads_cleared = all(p.grad is None for p in core.parameters())
        # step 2: both finite again: the ranks still step together
        results.append(optimizer_step(ddp, core, opt, scaler, imgs, cfg=cfg, device=cpu, rank=rank, step=2))
        flat = torch.cat([p.detach().reshape(-1) for p in core.parameters()])
        torch.save(
            {
                "results": [tuple(r) for r in results],
                "unchanged": unchanged,
                "grads_cleared": grads_cleared,
                "flat": flat,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_non_finite_loss_on_one_rank_skips_on_every_rank(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    (loss0, skipped0, sums0), (loss1, skipped1, sums1) = r0["results"][0], r1["results"][0]
    assert not skipped0 and not skipped1 and loss0 == loss1  # the mean over ranks, the same number on both
    assert sums0 == sums1 == [3.0, 1.0]  # (1 + 2, 0.5 + 0.5)
    assert r0["results"][1][1] and r1["results"][1][1], "both ranks skip when one rank's loss is NaN"
    assert r0["unchanged"] and r1["unchanged"] and r0["grads_cleared"] and r1["grads_cleared"]
    assert not r0["results"][2][1] and not r1["results"][2][1]
    assert torch.equal(r0["flat"], r1["flat"]), "DDP ranks diverged"
