"""Ray Tune sweeps over mask ratio and decoder size, the Ray 2.60 way.

One trial = one call of :func:`trial` = one full pretraining run (a ``TorchTrainer`` built by the training driver,
with Tune's report callback) = one child MLflow run under the sweep's parent run. The objective is k-NN top-1 on
labelled held-out data (``tune.metric=knn_top1``), reported at ``train.eval_every_steps`` so ASHA can stop poor
trials early; reconstruction loss is not comparable across mask ratios and is never the objective.
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

logger = logging.getLogger(__name__)

SWEEP_TAG = "mae.sweep_name"


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

    from mae_service.train.driver import pretrain

    base = params["base"]
    run_name = trial_run_name(params["sweep_name"], params)
    cfg = trial_config(base, params, run_name)
    pretrain(cfg, callbacks=[TuneReportCallback()],
             mlflow_tags={"mlflow.parentRunId": params["parent_run_id"], SWEEP_TAG: params["sweep_name"]})


def check_search_space(cfg: Config) -> None:
    """Validation beyond the config's own: each grid point must make a valid model config."""
    problems = []
    for w in cfg.tune.decoder_embed_dims:
        if w % cfg.model.decoder_num_heads:
            problems.append(f"tune.decoder_embed_dims has {w}, not divisible by model.decoder_num_heads="
                            f"{cfg.model.decoder_num_heads}")
    if cfg.tune.metric == "knn_top1" and not cfg.data.val_uri:
        problems.append("tune.metric=knn_top1 needs labelled held-out data: set data.val_uri")
    if cfg.train.eval_every_steps < 1:
        problems.append(f"train.eval_every_steps={cfg.train.eval_every_steps}: a sweep needs ≥ 1 so that the "
                        "scheduler sees the objective during training")
    if problems:
        raise ConfigError(problems)


def trial_resources(cfg: Config) -> float:
    """CPUs one trial needs to make progress: its train workers plus two Ray Data decode tasks.

    With less, concurrent trials' order-preserving data pipelines can each hold a decode task whose output waits
    for a task that cannot be scheduled (seen on the two-node local cluster: no trial progressed).
    """
    return cfg.train.num_workers * cfg.train.cpus_per_worker + 2 * cfg.data.decode_cpus


def _parent_run(cfg: Config, sweep_name: str, tracking_uri: str) -> str:
    import mlflow
    from mlflow.entities import Param

    from mae_service.train.driver import ensure_experiment, sanitize_uri

    client = mlflow.MlflowClient(tracking_uri)
    exp_id = ensure_experiment(client, cfg.mlflow.experiment, tracking_uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_name}' and "
                               "tags.`mae.role` = 'sweep'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=sweep_name, tags={SWEEP_TAG: sweep_name, "mae.role": "sweep"})
    params = {k: sanitize_uri(v) if isinstance(v, str) else v for k, v in cfg.flat().items()}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run.info.run_id


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


def sweep(cfg: Config) -> SweepResult:
    """Run (or continue) a sweep; register the best trial's encoder under ``tune.best_alias``."""
    import mlflow
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from mae_service.train.driver import (
        init_ray,
        latest_checkpoint,
        preflight,
        register_from_checkpoint,
        resolve_tracking_uri,
        storage,
    )

    check_search_space(cfg)
    preflight(cfg)
    tu, t = cfg.tune, cfg.train
    sweep_name = t.run_name or time.strftime("sweep-%Y%m%d-%H%M%S")
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)

    init_ray(cfg)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    per_trial = trial_resources(cfg)
    if per_trial > cpus:
        raise ConfigError([f"one trial needs {per_trial:g} CPUs (train.num_workers={t.num_workers} × "
                           f"train.cpus_per_worker={t.cpus_per_worker:g} + 2 × data.decode_cpus={cfg.data.decode_cpus:g}); "
                           f"the cluster has {cpus:g}"])
    if t.use_gpu and ray.cluster_resources().get("GPU", 0.0) < t.num_workers:
        raise ConfigError([f"one trial needs {t.num_workers} GPUs; the cluster has "
                           f"{ray.cluster_resources().get('GPU', 0.0):g}"])
    concurrency = tu.max_concurrent_trials or max(1, int(cpus // per_trial))

    parent_id = _parent_run(cfg, sweep_name, tracking_uri)
    base = cfg.to_dict()
    base["mlflow"]["tracking_uri"] = tracking_uri
    base["train"]["storage_path"] = _join(t.storage_path, sweep_name, "trials")
    param_space: dict[str, Any] = {
        "mask_ratio": tune.grid_search(list(tu.mask_ratios)),
        "decoder_embed_dim": tune.grid_search(list(tu.decoder_embed_dims)),
        "decoder_depth": tune.grid_search(list(tu.decoder_depths)) if tu.decoder_depths else None,
        "sample": tune.grid_search(list(range(tu.num_samples))) if tu.num_samples > 1 else 0,
        "base": base, "sweep_name": sweep_name, "parent_run_id": parent_id,
    }
    if tu.scheduler == "asha":
        steps = _total_steps(cfg)
        max_t = max(1, math.ceil(steps / t.eval_every_steps))
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=tu.metric,
                                  mode="max" if tu.metric == "knn_top1" else "min", max_t=max_t,
                                  grace_period=min(tu.grace_period, max_t), reduction_factor=tu.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    fs, root = storage(t.storage_path, cfg.data.s3_endpoint)
    # A trial holds (almost) no CPU itself: its TorchTrainer workers and Ray Data tasks hold the cluster CPUs.
    trainable = tune.with_resources(trial, {"CPU": 0.01})
    experiment_path = _join(root, sweep_name, "tune")
    run_config = tune.RunConfig(name="tune", storage_path=_join(root, sweep_name), storage_filesystem=fs,
                                failure_config=tune.FailureConfig(max_failures=max(0, t.max_failures)))
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
        logger.info("sweep %s: continuing from %s", sweep_name, experiment_path)
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True,
                                   param_space=param_space, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, run_config=run_config,
                           tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrency))
    logger.info("sweep %s: %d trials at most %d at a time, objective %s", sweep_name,
                len(tu.mask_ratios) * len(tu.decoder_embed_dims) * max(1, len(tu.decoder_depths)) * tu.num_samples,
                concurrency, tu.metric)
    client = mlflow.MlflowClient(tracking_uri)
    try:
        grid = tuner.fit()
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise

    table = []
    for res in grid:
        p = {k: res.config.get(k) for k in ("mask_ratio", "decoder_embed_dim", "decoder_depth", "sample")}
        m = res.metrics or {}
        row = {**p, tu.metric: m.get(tu.metric, float("nan")), "loss": m.get("loss", float("nan")),
               "step": m.get("step", 0), "reports": m.get("training_iteration", 0),
               "error": bool(res.error), "run_name": trial_run_name(sweep_name, res.config)}
        table.append(row)
    total = _total_steps(cfg)
    for row in table:
        row["stopped_early"] = (not row["error"]) and row["step"] < total
        _close_child(client, cfg, row)
    _log_table(client, parent_id, table, tu.metric)

    scored = [r for r in table if not r["error"] and not math.isnan(r[tu.metric])]
    best = (max if tu.metric == "knn_top1" else min)(scored, key=lambda r: r[tu.metric]) if scored else None
    result = SweepResult(sweep_name, parent_id, table, best)
    if best is not None:
        client.log_metric(parent_id, f"best_{tu.metric}", best[tu.metric])
        client.set_tag(parent_id, "mae.best_trial", best["run_name"])
        if cfg.registry.register:
            trial_cfg = trial_config(base, best, best["run_name"])
            found = latest_checkpoint(trial_cfg.train.storage_path, best["run_name"], cfg.data.s3_endpoint)
            if found is not None:
                from ray.train import Checkpoint

                from mae_service.train.driver import PretrainResult, _uri_of

                path, ckpt_fs, meta = found
                child = _child_run_id(client, cfg, best["run_name"])
                pr = PretrainResult(best["run_name"], child, tracking_uri,
                                    _uri_of(trial_cfg.train.storage_path, path, ""), meta.step, meta.loss,
                                    metrics={tu.metric: best[tu.metric]} if tu.metric == "knn_top1" else {})
                result.model_version = register_from_checkpoint(
                    trial_cfg, Checkpoint(path, filesystem=ckpt_fs), pr, alias=tu.best_alias,
                    extra_tags={"sweep_name": sweep_name, "sweep_run_id": parent_id, "trial": best["run_name"]})
    client.set_terminated(parent_id, status="FINISHED")
    return result


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _total_steps(cfg: Config) -> int:
    from mae_service.data import open_source, samples_per_rank

    src = open_source(cfg.data.train_uri, cfg.data.format, shard_size=cfg.data.shard_size,
                      s3_endpoint=cfg.data.s3_endpoint)
    rows = samples_per_rank(src, cfg.train.num_workers, cfg.micro_batch)
    steps = rows // cfg.micro_batch // cfg.accum_steps * cfg.train.epochs
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def _child_run_id(client, cfg: Config, run_name: str) -> str | None:
    from mae_service.train.driver import RUN_NAME_TAG

    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


def _close_child(client, cfg: Config, row: dict[str, Any]) -> None:
    """Trials stopped by the scheduler never reach their own end: mark their MLflow runs."""
    run_id = _child_run_id(client, cfg, row["run_name"])
    if run_id is None:
        return
    row["mlflow_run_id"] = run_id
    client.set_tag(run_id, "mae.stopped_early", str(row["stopped_early"]).lower())
    status = client.get_run(run_id).info.status
    if status == "RUNNING":
        client.set_terminated(run_id, status="FAILED" if row["error"] else "KILLED")


def _log_table(client, parent_id: str, table: list[dict[str, Any]], metric: str) -> None:
    import csv

    cols = ["mask_ratio", "decoder_embed_dim", "decoder_depth", "sample", metric, "loss", "step", "reports",
            "stopped_early", "error", "run_name", "mlflow_run_id"]
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
