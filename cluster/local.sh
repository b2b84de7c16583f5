#!/usr/bin/env bash
# A two-node Ray cluster on this machine, the one the end-to-end tests use (no separate copy).
#
#   eval "$(cluster/local.sh up)"      # stdout: only `export ...` lines; progress goes to stderr
#   ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/demo.yaml
#   cluster/local.sh down
#
# Commands: up | down | status | env (print the exports of the running cluster again).
#
# Every Ray process binds a loopback address: the head is 127.0.0.2, the worker node 127.0.0.3 (Ray otherwise
# picks the network card's address). Each node has its own temp dir and its own agent/metrics/worker ports.
# Token authentication is on, as in production: `up` generates a fresh token into Ray's own token file
# ($MAE_CLUSTER_DIR/auth_token, mode 600) and every node and client reads it through RAY_AUTH_TOKEN_PATH.
#
# The nodes inherit the caller's environment, so whatever a job needs (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, MLFLOW_TRACKING_URI, ...) must be exported before `up`. Nothing
# from it is written to disk.
#
# Settings (environment, all optional):
#   MAE_CLUSTER_DIR           state, logs and temp dirs             (/tmp/mae-local-cluster; keep it short:
#                                                                    Ray's socket paths must fit 107 bytes)
#   MAE_CLUSTER_HEAD_CPUS     logical CPUs of the head              (2; it also runs the job driver)
#   MAE_CLUSTER_WORKER_CPUS   logical CPUs of the worker node       (2)
#   MAE_CLUSTER_OBJECT_STORE  object-store bytes per node           (1073741824)
#   MAE_CLUSTER_GCS_PORT      head GCS port                         (6379)
#   MAE_CLUSTER_DASHBOARD_PORT dashboard / job API port             (8265)
#   MAE_CLUSTER_TIMEOUT       seconds to wait for each node         (120)
#   MAE_RAY                   the `ray` executable                  (.venv/bin/ray of this repo, else PATH)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${MAE_CLUSTER_DIR:-/tmp/mae-local-cluster}"
HEAD_IP=127.0.0.2
WORKER_IP=127.0.0.3
GCS_PORT="${MAE_CLUSTER_GCS_PORT:-6379}"
DASH_PORT="${MAE_CLUSTER_DASHBOARD_PORT:-8265}"
HEAD_CPUS="${MAE_CLUSTER_HEAD_CPUS:-2}"
WORKER_CPUS="${MAE_CLUSTER_WORKER_CPUS:-2}"
OBJECT_STORE="${MAE_CLUSTER_OBJECT_STORE:-1073741824}"
TIMEOUT="${MAE_CLUSTER_TIMEOUT:-120}"
TOKEN_FILE="$DIR/auth_token"

if [[ -n "${MAE_RAY:-}" ]]; then
    RAY="$MAE_RAY"
elif [[ -x "$ROOT/.venv/bin/ray" ]]; then
    RAY="$ROOT/.venv/bin/ray"
else
    RAY="$(command -v ray || true)"
fi
PY="$(dirname "${RAY:-/usr/bin/python3}")/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

log() { printf 'local.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- processes ----------------------------------------------------------------------------------------------------
alive() {  # PID $1 exists and is not a zombie (PID 1 of a container may never reap our orphans)
    local stat
    [[ -n "${1:-}" ]] && stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat:0:1}" != "Z" ]]
}
pid_of() { [[ -f "$DIR/$1.pid" ]] && cat "$DIR/$1.pid" || true; }

ours() {  # PID $1 is a process of this cluster: our token path in its environment, or our dir on its command line
    # (Ray renames some processes, e.g. ray::IDLE, which also hides their environment)
    local cmd
    tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -qxF "RAY_AUTH_TOKEN_PATH=$TOKEN_FILE" && return 0
    cmd="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true)"
    [[ "$cmd" == *"$DIR/"* ]]
}

session_members() {  # PIDs in the sessions led by our `ray start --block` processes (each runs under setsid):
    # found by session id, never by a program name. A live leader must be ours (our token path or dir); once
    # a leader is gone, its session id cannot be handed to a new process while any member remains, so every
    # remaining member is ours.
    local pid sid owner sids=" "
    for owner in "$@"; do
        if ! alive "$owner" || ours "$owner"; then
            sids="$sids$owner "
        fi
    done
    while read -r pid sid; do
        if [[ "$sids" == *" $sid "* && "$pid" != "$$" ]]; then
            echo "$pid"
        fi
    done < <(ps -eo pid=,sid=)
}

wait_gone() {  # wait_gone SECONDS PID...: wait up to SECONDS for the PIDs to exit; print those still alive
    local wait_s="$1" p left
    shift
    for _ in $(seq 1 $((wait_s * 4))); do
        left=""
        for p in "$@"; do alive "$p" && left="$left $p"; done
        [[ -z "$left" ]] && return 0
        sleep 0.25
    done
    echo "$left"
}

stop_all() {
    local owners="" p members left
    for p in "$(pid_of worker)" "$(pid_of head)"; do [[ -n "$p" ]] && owners="$owners $p"; done
    # shellcheck disable=SC2086
    members="$(session_members $owners)"
    [[ -z "$members" ]] && return 0
    log "stopping the local cluster ($(wc -w <<<"$members") processes)"
    # `ray start --block` stops its node's processes on SIGTERM (raylet, GCS, dashboard, workers); the worker
    # node first, then the head. What is still alive afterwards is stopped by PID.
    for p in $owners; do
        if alive "$p"; then
            kill -TERM "$p" 2>/dev/null || true
            wait_gone 30 "$p" >/dev/null || true
        fi
    done
    # shellcheck disable=SC2086
    left="$(wait_gone 5 $members)"
    if [[ -n "${left// /}" ]]; then
        # shellcheck disable=SC2086
        kill -TERM $left 2>/dev/null || true
        # shellcheck disable=SC2086
        left="$(wait_gone 10 $left)"
    fi
    if [[ -n "${left// /}" ]]; then
        log "force-stopping:$left"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
        sleep 0.5
    fi
}

# ---- cluster state ------------------------------------------------------------------------------------------------
exports() {
    printf 'export RAY_ADDRESS=%q\n' "http://$HEAD_IP:$DASH_PORT"
    printf 'export RAY_AUTH_MODE=token\n'
    printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$TOKEN_FILE"
}

alive_nodes() {  # number of ALIVE nodes the dashboard reports (0 when it does not answer)
    RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" "$PY" - "http://$HEAD_IP:$DASH_PORT" <<'EOF' 2>/dev/null || echo 0
import json, os, sys, urllib.request
token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
req = urllib.request.Request(sys.argv[1] + "/api/v0/nodes?limit=100&detail=false",
                             headers={"Authorization": "Bearer " + token})
with urllib.request.urlopen(req, timeout=5) as r:
    body = json.load(r)
print(sum(1 for n in body["data"]["result"]["result"] if n.get("state") == "ALIVE"))
EOF
}

wait_nodes() {  # wait until $1 nodes are alive, or fail with the log of $2
    local want="$1" role="$2" deadline=$((SECONDS + TIMEOUT)) n
    while ((SECONDS < deadline)); do
        if ! alive "$(pid_of "$role")"; then
            tail -n 40 "$DIR/$role.log" >&2 || true
            return 1
        fi
        n="$(alive_nodes)"
        ((n >= want)) && return 0
        sleep 1
    done
    log "$role: $want node(s) not alive after ${TIMEOUT}s; last lines of $DIR/$role.log:"
    tail -n 40 "$DIR/$role.log" >&2 || true
    return 1
}

start_node() {  # start_node ROLE ARGS...: `ray start --block` in its own session, in the background
    local role="$1"
    shift
    # The caller's environment reaches every Ray worker process; stale client settings must not.
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1: `0` (as some environments export) makes `ray start --address` refuse
    # to join a second node; `1` is Linux's default and lets the same script run on macOS.
    # The job entrypoint's `python` must be the one that runs Ray: put its folder first on PATH.
    env -u RAY_ADDRESS -u RAY_AUTH_TOKEN PATH="$(dirname "$RAY"):$PATH" \
        RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" \
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 \
        RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}" \
        DO_NOT_TRACK="${DO_NOT_TRACK:-true}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" \
        AWS_EC2_METADATA_DISABLED="${AWS_EC2_METADATA_DISABLED:-true}" \
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
        setsid "$RAY" start --block --disable-usage-stats --log-style=record "$@" \
        </dev/null >"$DIR/$role.log" 2>&1 &
    echo $! >"$DIR/$role.pid"
}

up() {
    [[ -n "$RAY" && -x "$RAY" ]] || die "no ray executable (set MAE_RAY or create .venv)"
    if alive "$(pid_of head)" || alive "$(pid_of worker)"; then
        die "the local cluster is already up ($DIR); run 'cluster/local.sh down' first, or 'cluster/local.sh env' for its exports"
    fi
    stop_all  # leftovers of a cluster whose `ray start` died
    clean
    mkdir -p "$DIR/head" "$DIR/worker"
    chmod 700 "$DIR"
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TOKEN_FILE")

    local seen=() v
    for v in AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION MLFLOW_TRACKING_URI \
        MLFLOW_S3_ENDPOINT_URL; do
        [[ -n "${!v:-}" ]] && seen+=("$v")
    done
    log "passing the caller's environment to the nodes (set: ${seen[*]:-none of AWS_*/MLFLOW_*})"

    log "starting head on $HEAD_IP:$GCS_PORT (dashboard http://$HEAD_IP:$DASH_PORT, $HEAD_CPUS CPUs)"
    start_node head --head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" \
        --include-dashboard=true --dashboard-host="$HEAD_IP" --dashboard-port="$DASH_PORT" \
        --ray-client-server-port=10001 --node-manager-port=52100 --object-manager-port=52101 \
        --dashboard-agent-listen-port=52102 --dashboard-agent-grpc-port=52103 \
        --runtime-env-agent-port=52104 --metrics-export-port=52105 \
        --min-worker-port=52200 --max-worker-port=52599 \
        --num-cpus="$HEAD_CPUS" --num-gpus=0 --object-store-memory="$OBJECT_STORE" --temp-dir="$DIR/head"
    if ! wait_nodes 1 head; then
        stop_all
        die "head did not start (log: $DIR/head.log)"
    fi

    log "starting worker node on $WORKER_IP ($WORKER_CPUS CPUs)"
    start_node worker --address="$HEAD_IP:$GCS_PORT" --node-ip-address="$WORKER_IP" \
        --node-manager-port=52110 --object-manager-port=52111 \
        --dashboard-agent-listen-port=52112 --dashboard-agent-grpc-port=52113 \
        --runtime-env-agent-port=52114 --metrics-export-port=52115 \
        --min-worker-port=52600 --max-worker-port=52999 \
        --num-cpus="$WORKER_CPUS" --num-gpus=0 --object-store-memory="$OBJECT_STORE" --temp-dir="$DIR/worker"
    if ! wait_nodes 2 worker; then
        stop_all
        die "worker node did not join (log: $DIR/worker.log)"
    fi
    exports >"$DIR/exports"
    log "up: 2 nodes alive; logs and state in $DIR"
    exports
}

clean() {  # remove what `up` wrote (only that: MAE_CLUSTER_DIR may be a folder with other things in it)
    rm -rf "$DIR/head" "$DIR/worker"
    rm -f "$DIR/auth_token" "$DIR/exports" "$DIR"/{head,worker}.{pid,log}
    rmdir "$DIR" 2>/dev/null || true
}

down() {
    stop_all
    clean
    log "down"
}

status() {
    local head worker
    head="$(pid_of head)"
    worker="$(pid_of worker)"
    if alive "$head"; then
        log "head running (pid $head), worker $(alive "$worker" && echo "running (pid $worker)" || echo "not running")," \
            "$(alive_nodes) node(s) alive at http://$HEAD_IP:$DASH_PORT"
        return 0
    fi
    log "not running"
    return 1
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env)
        alive "$(pid_of head)" || die "the local cluster is not up ($DIR)"
        exports
        ;;
    *)
        echo "usage: $0 up|down|status|env" >&2
        exit 2
        ;;
esac
