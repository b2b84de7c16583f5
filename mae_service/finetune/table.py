"""The results table of one registered encoder: k-NN, linear probe, partial and full fine-tune, scratch baseline.

Every fine-tuning row runs with the same recipe and budget (``finetune.*``, ``epochs``); the k-NN row scores the
frozen features and a random-init twin of the same architecture; the full fine-tune's random-init column is the
scratch baseline (``--from-scratch``: timm's random initialisation, same recipe and budget). The table is printed,
written as Markdown and CSV with a bar chart (PNG), and logged as the artifacts of one MLflow run whose child
runs are the fine-tunes. ``report(cfg, epochs=N)`` is callable from Python (the demo calls it with a short budget).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mae_service.config import Config, FinetuneConfig
from mae_service.finetune.driver import finetune, protocol
from mae_service.finetune.preflight import preflight
from mae_service.tracking.runs import connect, ensure_experiment, resolve_tracking_uri

logger = logging.getLogger(__name__)
HEADER = ["protocol", "trains", "top1", "top5", "random_init_top1", "seconds"]


@dataclass
class ReportRow:
    protocol: str
    trains: str
    top1: float
    top5: float | None = None
    random_init_top1: float | None = None
    seconds: float = 0.0
    run_id: str | None = None


@dataclass
class ReportResult:
    rows: list[ReportRow]
    markdown: str
    csv: str
    mlflow_run_id: str
    out_dir: str
    model_uri: str
    epochs: int
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, proto: str) -> ReportRow:
        return next(r for r in self.rows if r.protocol == proto)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_uri": self.model_uri,
            "epochs": self.epochs,
            "mlflow_run_id": self.mlflow_run_id,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _markdown(rows: list[ReportRow], title: str) -> str:
    lines = [
        f"{title}",
        "",
        "| protocol | trains | top-1 | top-5 | random init top-1 | wall s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r.protocol, r.trains, _fmt(r.top1), _fmt(r.top5), _fmt(r.random_init_top1), f"{r.seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv(rows: list[ReportRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(HEADER)
    for r in rows:
        w.writerow(
            [
                r.protocol,
                r.trains,
                r.top1,
                r.top5 if r.top5 is not None else "",
                "" if r.random_init_top1 is None else r.random_init_top1,
                r.seconds,
            ]
        )
    return buf.getvalue()


def _chart(rows: list[ReportRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 3.6), dpi=100)
    xs = list(range(len(rows)))
    ax.bar([x - 0.2 for x in xs], [r.top1 for r in rows], width=0.4, label="pretrained (MAE)", color="#3b6ea5")
    rand = [r.random_init_top1 if r.random_init_top1 is not None else 0.0 for r in rows]
    ax.bar([x + 0.2 for x in xs], rand, width=0.4, label="random init", color="#bbbbbb")
    ax.set_xticks(xs, [r.protocol for r in rows], rotation=20)
    ax.set_ylabel("val top-1")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _knn_row(cfg: Config, model_uri: str) -> ReportRow:
    from mae_service.tracking.evaluations import evaluate_model

    t0 = time.monotonic()
    m = evaluate_model(
        model_uri,
        cfg.data.train_uri,
        str(cfg.data.val_uri),
        fmt=cfg.data.format,
        k=cfg.train.knn_k,
        linear_probe=False,
        random_baseline=True,
        s3_endpoint=cfg.data.s3_endpoint,
        tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri),
        amp=cfg.train.amp,
    )
    return ReportRow(
        "knn", "nothing (frozen features)", m["knn_top1"], None, m["knn_top1_random_init"], time.monotonic() - t0
    )


def row_configs(
    base: FinetuneConfig, depth: int, partial_blocks: tuple[int, ...], stamp: str
) -> list[tuple[str, FinetuneConfig]]:
    """``(protocol, finetune section)`` of each fine-tune row, in table order: linear probe, the partial fine-tunes
    that fit an encoder of ``depth`` blocks, full fine-tune, scratch baseline. Each row's classifier is registered
    under an alias of its own (``report-<protocol>``), so a report never moves ``finetune.alias`` (``@current``)
    to, say, its scratch baseline."""
    plan = [(0, False), *((k, False) for k in partial_blocks if 1 <= k <= depth), (None, False), (None, True)]
    rows = []
    for blocks, scratch in plan:
        proto = protocol(blocks, scratch)
        ft = dataclasses.replace(
            base, blocks=blocks, from_scratch=scratch, run_name=f"report-{stamp}-{proto}", alias=f"report-{proto}"
        )
        rows.append((proto, ft))
    return rows


def report(
    cfg: Config,
    *,
    epochs: int | None = None,
    partial_blocks: tuple[int, ...] = (1, 2),
    out_dir: str | None = None,
    short: bool = False,
) -> ReportResult:
    """Run every protocol on ``cfg.finetune.model_uri`` with the same budget (``epochs``, default
    ``finetune.epochs``) and tabulate their held-out top-1. Checks everything (as ``eval finetune`` does) before
    any Ray work; partial rows deeper than the encoder are left out. ``short``: only the full fine-tune and the
    scratch baseline (what ``mae-service demo`` ends with)."""
    base_ft = dataclasses.replace(
        cfg.finetune, blocks=None, from_scratch=False, epochs=epochs or cfg.finetune.epochs, run_name=None
    )
    cfg = dataclasses.replace(cfg, finetune=base_ft)
    inputs = preflight(cfg)
    depth = int(inputs.arch["timm_kwargs"]["depth"])
    pinned = inputs.source_uri
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(base_ft, model_uri=pinned))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    title = f"{pinned}: val top-1 after {base_ft.epochs} epochs per fine-tune ({cfg.data.val_uri})"
    client, uri = connect(resolve_tracking_uri(cfg.mlflow.tracking_uri), must_exist=False)
    exp = ensure_experiment(client, cfg.mlflow.experiment, uri)
    parent = client.create_run(
        exp, run_name=f"report-{inputs.source_name}-v{inputs.source_version}-{stamp}",
        tags={"mae_service.kind": "report", "mae_service.source_model_uri": pinned},
    ).info.run_id  # fmt: skip
    try:
        rows = [] if short else [_knn_row(cfg, pinned)]
        skipped = [k for k in partial_blocks if not 1 <= k <= depth]
        if skipped and not short:
            logger.warning("report: partial blocks %s left out (the encoder has %d blocks)", skipped, depth)
        trains = {"linear": "head (BatchNorm + linear)", "finetune": "all blocks", "scratch": "all, random init"}
        for proto, ft in row_configs(cfg.finetune, depth, partial_blocks, stamp):
            if short and proto not in ("finetune", "scratch"):
                continue
            blocks = ft.blocks
            res = finetune(dataclasses.replace(cfg, finetune=ft), mlflow_tags={"mlflow.parentRunId": parent})
            label = trains.get(proto, f"last {blocks} block{'s' if blocks != 1 else ''} + norm + head")
            rows.append(ReportRow(proto, label, res.top1, res.top5, None, res.seconds, res.mlflow_run_id))
        full = next(r for r in rows if r.protocol == "finetune")
        full.random_init_top1 = next(r for r in rows if r.protocol == "scratch").top1
        md, text = _markdown(rows, title), _csv(rows)
        out = Path(out_dir or tempfile.mkdtemp(prefix="mae-report-"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(md + "\n")
        (out / "report.csv").write_text(text)
        _chart(rows, out / "report.png", title)
        for name in ("report.md", "report.csv", "report.png"):
            client.log_artifact(parent, str(out / name))
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(parent, metrics=[Metric(f"{r.protocol}_top1", r.top1, now, 0) for r in rows])
        client.set_terminated(parent, status="FINISHED")
    except BaseException:
        client.set_terminated(parent, status="FAILED")
        raise
    return ReportResult(rows, md, text, parent, str(out), pinned, base_ft.epochs)
