"""Ray Tune sweeps over mask ratio and decoder size, the Ray 2.60 way.

One trial = one call of :func:`trial` = one full pretraining run (the training driver's :func:`pretrain`, with
Tune's report callback) = one child MLflow run under the sweep's parent run. The objective is k-NN top-1 on
labelled held-out data (``tune.metric=knn_top1``), reported at ``train.eval_every_steps`` so ASHA can stop poor
trials early; reconstruction loss is not comparable across mask ratios and is never the objective.

Uses only :mod:`mae_service.runtime`, :mod:`mae_service.tracking.runs` and the driver's public API.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from mae_service.config import Config, ConfigError, build_config
from mae_service.data.storage import join
from mae_service.runtime import cluster_cpus_gpus, init_ray
from mae_service.tracking.runs import ROLE_TAG, SWEEP_TAG, connect, ensure_experiment, find_run_by_name, open_run
from mae_service.train.driver import preflight, pretrain, register_latest

logger = logging.getLogger(__name__)

PARAMS = ("mask_ratio", "decoder_embed_dim", "decoder_depth", "sample")


@dataclass
class SweepResult:
    sweep_name: str
    parent_run_id: str
    table: list[dict[str, Any]]
    best: dict[str, Any] | None
    model_version: Any = None


def trial_config(base: dict[str, Any], params: dict[str, Any], run_name: str) -> Config:
    """The pretraining config of one trial: the sweep's config with the trial's model settings."""
    d = copy.deepcopy(base)
    d["model"]["mask_ratio"] = params["mask_ratio"]
    d["model"]["decoder_embed_dim"] = params["decoder_embed_dim"]
    if params.get("decoder_depth") is not None:
        d["model"]["decoder_depth"] = params["decoder_depth"]
    d["train"]["run_name"] = run_name
    d["registry"]["register"] = False  # only the best trial is registered, by the sweep driver
    return build_config(d)


def trial_run_name(sweep_name: str, params: dict[str, Any]) -> str:
    depth = params.get("decoder_depth")
    name = f"{sweep_name}-mr{params['mask_ratio']:g}-dw{params['decoder_embed_dim']}"
    return name + (f"-dd{depth}" if depth is not None else "") + f"-s{params.get('sample', 0)}"


def trial(params: dict[str, Any]) -> None:
    """Tune's function trainable: run one pretraining trial and stream its reports to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    base = params["base"]
    run_name = trial_run_name(params["sweep_name"], params)
    cfg = trial_config(base, params, run_name)
    pretrain(
        cfg,
        callbacks=[TuneReportCallback()],
        mlflow_tags={"mlflow.parentRunId": params["parent_run_id"], SWEEP_TAG: params["sweep_name"]},
    )


def check_search_space(cfg: Config) -> None:
    """What a sweep needs beyond a valid pretraining config: held-out data and evaluations during training."""
    problems = []
    if cfg.tune.metric == "knn_top1" and not cfg.data.val_uri:
        problems.append("tune.metric=knn_top1 needs labelled held-out data: set data.val_uri")
    if cfg.train.eval_every_steps < 1:
        problems.append(
            f"train.eval_every_steps={cfg.train.eval_every_steps}: a sweep needs ≥ 1 so that the "
            "scheduler sees the objective during training"
        )
    if problems:
        raise ConfigError(problems)


def trial_resources(cfg: Config) -> float:
    """CPUs one trial needs to make progress: its train workers plus two Ray Data decode tasks.

    With less, concurrent trials' order-preserving data pipelines can each hold a decode task whose output waits
    for a task that cannot be scheduled (seen on the two-node local cluster: no trial progressed).
    """
    return cfg.train.num_workers * cfg.train.cpus_per_worker + 2 * cfg.data.decode_cpus


def _capacity(cfg: Config) -> int:
    """How many trials run at once; ConfigError when not even one fits on the cluster."""
    t = cfg.train
    cpus, gpus = cluster_cpus_gpus()
    per_trial = trial_resources(cfg)
    problems = []
    if per_trial > cpus:
        problems.append(
            f"one trial needs {per_trial:g} CPUs (train.num_workers={t.num_workers} × "
            f"train.cpus_per_worker={t.cpus_per_worker:g} + 2 × data.decode_cpus="
            f"{cfg.data.decode_cpus:g}); the cluster has {cpus:g}"
        )
    if t.use_gpu and gpus < t.num_workers:
        problems.append(f"one trial needs {t.num_workers} GPUs; the cluster has {gpus:g}")
    if problems:
        raise ConfigError(problems)
    return cfg.tune.max_concurrent_trials or max(1, int(cpus // per_trial))


def _scheduler(cfg: Config, total_steps: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tu = cfg.tune
    if tu.scheduler != "asha":
        return FIFOScheduler()
    max_t = max(1, math.ceil(total_steps / cfg.train.eval_every_steps))
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=tu.metric,
        mode="max",
        max_t=max_t,
        grace_period=min(tu.grace_period, max_t),
        reduction_factor=tu.reduction_factor,
    )


def _tuner(cfg: Config, sweep_name: str, param_space: dict[str, Any], total_steps: int, concurrency: int) -> Any:
    """A new Tuner, or the sweep's own restored from its storage (a resubmitted sweep continues)."""
    from ray import tune

    from mae_service.data.storage import filesystem_for

    fs, root = filesystem_for(cfg.train.storage_path, s3_endpoint=cfg.data.s3_endpoint)
    # A trial holds (almost) no CPU itself: its TorchTrainer workers and Ray Data tasks hold the cluster CPUs.
    trainable = tune.with_resources(trial, {"CPU": 0.01})
    experiment_path = join(root, sweep_name, "tune")
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
        logger.info("sweep %s: continuing from %s", sweep_name, experiment_path)
        return tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_errored=True, param_space=param_space, storage_filesystem=fs
        )
    run_config = tune.RunConfig(
        name="tune",
        storage_path=join(root, sweep_name),
        storage_filesystem=fs,
        failure_config=tune.FailureConfig(max_failures=max(0, cfg.train.max_failures)),
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        run_config=run_config,
        tune_config=tune.TuneConfig(scheduler=_scheduler(cfg, total_steps), max_concurrent_trials=concurrency),
    )


def _param_space(cfg: Config, base: dict[str, Any], sweep_name: str, parent_id: str) -> dict[str, Any]:
    from ray import tune

    tu = cfg.tune
    return {
        "mask_ratio": tune.grid_search(list(tu.mask_ratios)),
        "decoder_embed_dim": tune.grid_search(list(tu.decoder_embed_dims)),
        "decoder_depth": tune.grid_search(list(tu.decoder_depths)) if tu.decoder_depths else None,
        "sample": tune.grid_search(list(range(tu.num_samples))) if tu.num_samples > 1 else 0,
        "base": base,
        "sweep_name": sweep_name,
        "parent_run_id": parent_id,
    }


def sweep(cfg: Config) -> SweepResult:
    """Run (or continue) a sweep; register the best trial's encoder under ``tune.best_alias``."""
    check_search_space(cfg)
    total_steps = preflight(cfg).plan.total_steps
    tu, t = cfg.tune, cfg.train
    sweep_name = t.run_name or time.strftime("sweep-%Y%m%d-%H%M%S")
    client, tracking_uri = connect(cfg.mlflow.tracking_uri, must_exist=False)
    init_ray(trial_resources(cfg))
    concurrency = _capacity(cfg)
    exp_id = ensure_experiment(client, cfg.mlflow.experiment, tracking_uri)
    parent_id = open_run(
        client, exp_id, run_name=sweep_name, key_tags={SWEEP_TAG: sweep_name, ROLE_TAG: "sweep"}, params=cfg.flat()
    )
    base = cfg.to_dict()
    base["mlflow"]["tracking_uri"] = tracking_uri
    base["train"]["storage_path"] = join(t.storage_path, sweep_name, "trials")
    tuner = _tuner(cfg, sweep_name, _param_space(cfg, base, sweep_name, parent_id), total_steps, concurrency)
    logger.info(
        "sweep %s: %d trials at most %d at a time, objective %s",
        sweep_name,
        len(tu.mask_ratios) * len(tu.decoder_embed_dims) * max(1, len(tu.decoder_depths)) * tu.num_samples,
        concurrency,
        tu.metric,
    )
    try:
        grid = tuner.fit()
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    table = [_row(cfg, sweep_name, res, total_steps) for res in grid]
    for row in table:
        _close_child(client, cfg, row)
    _log_table(client, parent_id, table, tu.metric)
    result = SweepResult(sweep_name, parent_id, table, _best(table, tu.metric))
    if result.best is not None:
        result.model_version = _record_best(client, cfg, base, result)
    client.set_terminated(parent_id, status="FINISHED")
    return result


def _row(cfg: Config, sweep_name: str, res: Any, total_steps: int) -> dict[str, Any]:
    """One trial's line of the results table."""
    metric = cfg.tune.metric
    m = res.metrics or {}
    row = {
        **{k: res.config.get(k) for k in PARAMS},
        metric: m.get(metric, float("nan")),
        "loss": m.get("loss", float("nan")),
        "step": m.get("step", 0),
        "reports": m.get("training_iteration", 0),
        "error": bool(res.error),
        "run_name": trial_run_name(sweep_name, res.config),
    }
    row["stopped_early"] = (not row["error"]) and row["step"] < total_steps
    return row


def _best(table: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    scored = [r for r in table if not r["error"] and not math.isnan(r[metric])]
    return max(scored, key=lambda r: r[metric]) if scored else None


def _record_best(client: Any, cfg: Config, base: dict[str, Any], result: SweepResult) -> Any:
    """The best trial's score on the parent run; its encoder registered under ``tune.best_alias``."""
    best, metric = result.best, cfg.tune.metric
    assert best is not None
    client.log_metric(result.parent_run_id, f"best_{metric}", best[metric])
    client.set_tag(result.parent_run_id, "mae.best_trial", best["run_name"])
    if not cfg.registry.register:
        return None
    return register_latest(
        trial_config(base, best, best["run_name"]),
        alias=cfg.tune.best_alias,
        metrics={metric: best[metric]},
        extra_tags={"sweep_name": result.sweep_name, "sweep_run_id": result.parent_run_id, "trial": best["run_name"]},
    )


def _close_child(client, cfg: Config, row: dict[str, Any]) -> None:
    """Trials stopped by the scheduler never reach their own end: mark their MLflow runs."""
    run_id = find_run_by_name(client, cfg.mlflow.experiment, row["run_name"])
    if run_id is None:
        return
    row["mlflow_run_id"] = run_id
    client.set_tag(run_id, "mae.stopped_early", str(row["stopped_early"]).lower())
    status = client.get_run(run_id).info.status
    if status == "RUNNING":
        client.set_terminated(run_id, status="FAILED" if row["error"] else "KILLED")


def _plot(table: list[dict[str, Any]], metric: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_width: dict[tuple, list] = {}
    for row in table:
        by_width.setdefault((row["decoder_embed_dim"], row.get("decoder_depth")), []).append(row)
    for (width, depth), rows in sorted(by_width.items(), key=lambda kv: str(kv[0])):
        rows = sorted(rows, key=lambda r: r["mask_ratio"])
        label = f"decoder {width}" + (f"×{depth}" if depth is not None else "")
        ax.plot([r["mask_ratio"] for r in rows], [r[metric] for r in rows], marker="o", label=label)
    ax.set_xlabel("mask ratio")
    ax.set_ylabel(metric)
    ax.set_title("MAE sweep: objective over mask ratio and decoder width")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _log_table(client, parent_id: str, table: list[dict[str, Any]], metric: str) -> None:
    import csv

    cols = [
        "mask_ratio",
        "decoder_embed_dim",
        "decoder_depth",
        "sample",
        metric,
        "loss",
        "step",
        "reports",
        "stopped_early",
        "error",
        "run_name",
        "mlflow_run_id",
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for row in sorted(table, key=lambda r: (r["decoder_embed_dim"], r["mask_ratio"])):
        w.writerow(row)
    client.log_text(parent_id, buf.getvalue(), "sweep/results.csv")
    logger.info("sweep results:\n%s", buf.getvalue())
    ok = [r for r in table if not math.isnan(r[metric])]
    if ok:
        fig = _plot(ok, metric)
        client.log_figure(parent_id, fig, "sweep/objective.png")
