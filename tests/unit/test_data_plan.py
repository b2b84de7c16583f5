"""The per-rank plan (pure numpy): exact equal counts, disjoint ranks, seeded order, resume = tail."""

from __future__ import annotations

import numpy as np
import pytest

from mae_service.data.pipeline import item_order, plan_rank
from mae_service.data.source import Shard, Source, samples_per_rank


def rows(units: np.ndarray) -> list[tuple[int, int, int]]:
    """Expand units into (epoch, shard, position-in-shard-order) rows."""
    return [(int(e), int(s), p) for e, s, a, b in units for p in range(a, b)]


@pytest.mark.parametrize("counts,world,batch", [([10, 7, 13, 5, 9], 2, 4), ([100], 3, 8), ([3] * 17, 4, 2)])
def test_ranks_get_equal_disjoint_counts(counts, world, batch):
    src = Source("mem://", "wds", [Shard(f"s{i}", c) for i, c in enumerate(counts)])
    per = samples_per_rank(src, world, batch)
    assert per % batch == 0 and per * world <= sum(counts) and per * world > sum(counts) - world * batch
    counts_a = np.array(counts)
    all_rows = []
    for r in range(world):
        units = plan_rank(counts_a, seed=1, rank=r, world_size=world, per_rank=per, epochs=3)
        rr = rows(units)
        assert len(rr) == 3 * per
        for e in range(3):
            assert sum(1 for x in rr if x[0] == e) == per
        all_rows.append(set(rr))
        assert np.all(units[:, 3] <= counts_a[units[:, 1]])
    for i in range(world):
        for j in range(i + 1, world):
            assert not all_rows[i] & all_rows[j]


def test_seed_sets_the_order_and_epochs_differ():
    counts = np.array([5] * 20)
    a = plan_rank(counts, seed=1, rank=0, world_size=1, per_rank=100, epochs=2)
    b = plan_rank(counts, seed=1, rank=0, world_size=1, per_rank=100, epochs=2)
    c = plan_rank(counts, seed=2, rank=0, world_size=1, per_rank=100, epochs=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    e0, e1 = a[a[:, 0] == 0, 1], a[a[:, 0] == 1, 1]
    assert sorted(e0) == sorted(e1) == list(range(20)) and not np.array_equal(e0, e1)
    assert not np.array_equal(item_order(1, 0, 3, 50), item_order(1, 1, 3, 50))
    assert sorted(item_order(1, 0, 3, 50)) == list(range(50))


@pytest.mark.parametrize("start", [0, 1, 17, 40, 41, 95, 120])
def test_resume_is_the_tail(start):
    counts = np.array([7, 11, 6, 9, 8])
    full = rows(plan_rank(counts, seed=3, rank=1, world_size=2, per_rank=20, epochs=6))
    tail = rows(plan_rank(counts, seed=3, rank=1, world_size=2, per_rank=20, epochs=6, start_sample=start))
    assert tail == full[start:]


def test_bad_arguments():
    src = Source("mem://", "wds", [Shard("s", 10)])
    with pytest.raises(ValueError, match="too few"):
        samples_per_rank(src, 4, 4)
    with pytest.raises(ValueError, match="start_sample"):
        plan_rank(np.array([10]), seed=0, rank=0, world_size=1, per_rank=10, epochs=1, start_sample=11)


def test_rank_jobs_carry_their_share_of_the_listing(tmp_path):
    """4 ranks over 10k loose files: each rank's job (what its decode tasks receive) pickles to ≤ 1/3 of the
    whole listing, and the ranks' keys are the listing, each key once."""
    import pickle

    from mae_service.data.pipeline import job_keys, train_job
    from mae_service.data.source import open_source

    for c in range(10):
        folder = tmp_path / f"class_{c:02d}"
        folder.mkdir()
        for i in range(1000):
            (folder / f"img_{i:05d}.jpg").touch()
    src = open_source(str(tmp_path), "files")
    assert src.num_images == 10_000 and len(src.class_names) == 10
    whole = len(pickle.dumps(src))
    keys = []
    for rank in range(4):
        job = train_job(src, rank=rank, world_size=4, image_size=32, seed=0, batch_size=50, epochs=1)
        assert len(pickle.dumps(job)) <= whole / 3, (rank, len(pickle.dumps(job)), whole)
        keys += job_keys(job)
    listing = [s.key(i) for s in src.shards for i in range(s.count)]
    assert len(keys) == len(set(keys)) == 10_000 and set(keys) == set(listing)
    key_bytes = sum(len(k) for k in listing) - 10_000 * len(f"{tmp_path}/")
    assert whole < key_bytes + 10_000 * 20, "compact: the keys' own bytes and ~16 more each, not an object per key"


@pytest.mark.parametrize(
    "cpus,workers,per_worker,decode,expected",
    [(7, 2, 1, 1, 1), (64, 8, 1, 1, 6), (4, 3, 1, 1, 1), (10, 2, 1, 0.5, 7), (2, 2, 1, 1, 1)],
)
def test_each_rank_gets_its_part_of_the_decode_cpus(cpus, workers, per_worker, decode, expected):
    """Every rank's stream may start its part of the free CPUs' decode tasks less one (never less than one), so
    even with one more task per rank still holding a CPU, no rank's read-ahead takes the CPUs another rank needs;
    the local Ray is sized so that holds for the smallest cap."""
    from mae_service.data.pipeline import decode_tasks_per_rank, local_cpus_needed

    n = decode_tasks_per_rank(cpus, num_workers=workers, cpus_per_worker=per_worker, decode_cpus=decode)
    assert n == expected
    free = cpus - workers * per_worker
    assert n == 1 or (n + 1) * workers * decode <= free
    local = local_cpus_needed(num_workers=workers, cpus_per_worker=per_worker, decode_cpus=decode)
    assert local - workers * per_worker >= 2 * workers * decode


def test_idle_backoff_pauses_only_between_rounds_that_returned_at_once(monkeypatch):
    """The callback sleeps after a scheduling round that came straight back (the spin), never after one that
    waited; the clock and the sleep are recorded, not real."""
    import mae_service.data.idle_backoff as ib

    clock = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(ib.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(ib.time, "sleep", lambda s: slept.append(s))
    cb = ib.IdleBackoff()
    clock[0] += 0.1  # a round that waited 100 ms in ray.wait
    cb.on_execution_step(None)
    assert slept == []
    clock[0] += 0.0002  # a round that came straight back
    cb.on_execution_step(None)
    assert slept == [ib.IdleBackoff.PAUSE_S]


def test_train_stream_caps_its_tasks_and_backs_off_when_idle(tmp_path):
    """The dataset a rank trains on carries both: the task cap (TaskPoolStrategy) and the idle back-off."""
    from mae_service.data import open_source, train_dataset
    from mae_service.data.idle_backoff import IdleBackoff
    from mae_service.data.synth import synthesize

    synthesize(str(tmp_path), num_images=12, image_size=16, classes=2, fmt="files", seed=0)
    src = open_source(str(tmp_path), fmt="files")
    ds = train_dataset(src, rank=0, world_size=1, image_size=16, seed=0, batch_size=4, epochs=2, max_tasks=1)
    assert IdleBackoff in ds.context.custom_execution_callback_classes
    op = ds._logical_plan.dag  # the map over the unit ranges
    assert op.compute.size == 1, op.compute
