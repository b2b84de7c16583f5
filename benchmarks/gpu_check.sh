#!/usr/bin/env bash
# The GPU checks of issue 15 in one run (≤ 8 minutes on one H100/H200), one JSON at the end.
#
#   benchmarks/gpu_check.sh [OUT.json]        # default: $OUT/gpu_check.json, else ./gpu_check.json
#   benchmarks/gpu_check.sh --smoke [OUT]     # anywhere (CPU ok): tiny model, 2 steps, to check the scripts
#
# Parts, each with its own time limit so one slow part cannot take the others' figures with it:
#   1. gpu_step.py     ViT-B/16, L/16, H/14: bf16 + SDPA + fused AdamW, eager and torch.compile; MFU   (≤ 220 s)
#   2. decode.py       PIL draft vs torchvision CPU vs nvjpeg batched, img/s per core / per GPU         (≤ 45 s)
#   3. gpu_trainer.py  the trainer on one GPU fed by Ray Data, CPU decode and GPU decode, data-wait     (≤ 200 s)
# Without CUDA (and without --smoke) it stops at once with exit code 2.
set -u
cd "$(dirname "$0")/.."
SMOKE=""
if [ "${1:-}" = "--smoke" ]; then SMOKE="--smoke"; shift; fi
OUT_JSON="${1:-${OUT:+$OUT/gpu_check.json}}"
OUT_JSON="${OUT_JSON:-gpu_check.json}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [ -z "$SMOKE" ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: no CUDA device visible to torch (torch.cuda.is_available() is False); run with --smoke on CPU" >&2
  exit 2
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader

start=$(date +%s)
part() {  # part NAME LIMIT_S CMD...: run with a time limit, keep its JSON (or the error) under $WORK/NAME.json
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" --json "$WORK/$name.json" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s"
  tail -n 5 "$WORK/$name.log"
  [ -s "$WORK/$name.json" ] || printf '{"error": "rc=%s", "log_tail": %s}' "$rc" \
    "$("$PY" -c 'import json,sys; print(json.dumps(open(sys.argv[1], errors="replace").read()[-3000:]))' "$WORK/$name.log")" \
    >"$WORK/$name.json"
}

if [ -n "$SMOKE" ]; then
  part gpu_step 300 "$PY" -W ignore benchmarks/gpu_step.py --smoke
  part decode 120 "$PY" -W ignore benchmarks/decode.py --images 4 --min-s 0.4
  part trainer 400 "$PY" -W ignore benchmarks/gpu_trainer.py --smoke
else
  part gpu_step 220 "$PY" -W ignore benchmarks/gpu_step.py --deadline-s 150
  part decode 45 "$PY" -W ignore benchmarks/decode.py --images 64 --min-s 3 --batch 128
  part trainer 200 "$PY" -W ignore benchmarks/gpu_trainer.py --images 3000 --steps 30
fi

mkdir -p "$(dirname "$OUT_JSON")"
"$PY" - "$WORK" "$OUT_JSON" "$(( $(date +%s) - start ))" "${SMOKE:-full}" <<'PYEOF'
import json, sys
from pathlib import Path
work, out, wall, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
res = {"mode": mode.lstrip("-"), "wall_s": wall}
for name in ("gpu_step", "decode", "trainer"):
    try:
        res[name] = json.loads((work / f"{name}.json").read_text())
    except (OSError, ValueError) as e:
        res[name] = {"error": f"no JSON: {e}"}
step, tr = res["gpu_step"].get("models", {}), res["trainer"].get("runs", [])
b16 = step.get("vit_b16", {}).get("eager") or {}
if b16 and tr:  # the trainer runs ViT-B/16 eager (train.compile=false): over the eager model-only step
    res["trainer_over_model_only"] = {r["decode_device"]: round(r["img_per_s"] / b16["img_per_s"], 3)
                                      for r in tr if "img_per_s" in r}
out.write_text(json.dumps(res, indent=1))
print(f"wrote {out} ({wall} s)")
PYEOF
