#!/bin/bash
# RayDog head node task, the same on a YellowDog node (booted with node-userdata.sh) and on the
# local platform's nodes; what differs comes through the task environment (all optional):
#   RAYDOG_VENV        venv with Ray and prefect-raydog (default below; empty: PATH's `ray`).
#   RAY_NODE_IP_ARGS   address flags, e.g. "--node-ip-address=127.0.0.1"; unset: Ray finds it.
#   RAY_HEAD_PORT      GCS port (6379); RAY_CLIENT_PORT  Ray Client port (10001).
#   RAY_INCLUDE_DASHBOARD  "false": no dashboard; otherwise it listens on the head's loopback
#                      only, port RAY_DASHBOARD_PORT (8265): reach it through an SSH tunnel.
#   RAY_METRICS_EXPORT_PORT  Prometheus metrics port (8080; empty: one Ray picks).
#   RAY_OBJECT_STORE_MEMORY  object store bytes (Ray's default share of memory when unset).
#   RAY_INCLUDE_LOG_MONITOR  "false": no log monitor.
#   RAY_HEAD_ARGS      extra `ray start` arguments; later flags win (e.g. --num-cpus=2).
#   RAYDOG_TOKEN_FILE  Ray's token authentication, with the token in this file (relative: to
#                      $HOME), awaited up to RAYDOG_TOKEN_WAIT_S (300) s; unset: no authentication.
#   RAY_AUTOSCALING_CONFIG  runs Ray's autoscaler with this config (relative: to $HOME), awaited
#                      until `ray up` uploads it (set by the RayDog Autoscaler).
#   OBSERVABILITY_HOST set by the Builder when the cluster has an observability node.
#   RAYDOG_DRIVERLESS_GRACE_S, RAYDOG_FIRST_DRIVER_WITHIN_S  set by the task runner: the task ends
#                      once no Ray driver has been connected for that long (driver_watch.py).
# The head runs no tasks (--num-cpus=0 --memory=0).
set -euo pipefail
RAYDOG_VENV="${RAYDOG_VENV-/opt/yellowdog/agent/venv}"
if [[ -n "$RAYDOG_VENV" ]]; then
    source "$RAYDOG_VENV/bin/activate"
fi

# Ray is unreliable without these: gRPC fork support crashes about 1 in 3 Ray Client servers, and
# draining must not wait for a dead GCS. No usage reports leave the node.
export GRPC_ENABLE_FORK_SUPPORT="${GRPC_ENABLE_FORK_SUPPORT:-0}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
# A machine that dies sends no FIN or RST: without a short gRPC keepalive, a task that was running
# on it stays pending for Ray's default keepalive (5 min + 2 min) before its owner gives up.
export RAY_grpc_client_keepalive_time_ms=10000 RAY_grpc_client_keepalive_timeout_ms=10000

# Explicit either way: with RAY_AUTH_MODE unset, a stray ~/.ray/auth_token turns token auth on.
if [[ -n "${RAYDOG_TOKEN_FILE:-}" ]]; then
    [[ "$RAYDOG_TOKEN_FILE" == /* ]] || RAYDOG_TOKEN_FILE="$HOME/$RAYDOG_TOKEN_FILE"
    for (( tries = ${RAYDOG_TOKEN_WAIT_S:-300} * 5; tries > 0; tries-- )); do
        [[ -s "$RAYDOG_TOKEN_FILE" ]] && break
        sleep 0.2
    done
    if [[ ! -s "$RAYDOG_TOKEN_FILE" ]]; then
        echo "No Ray token in $RAYDOG_TOKEN_FILE after ${RAYDOG_TOKEN_WAIT_S:-300} s" >&2
        exit 1
    fi
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$RAYDOG_TOKEN_FILE"
else
    export RAY_AUTH_MODE=disabled
fi

if [[ -n "${OBSERVABILITY_HOST:-}" ]]; then
    export RAY_PROMETHEUS_HOST="http://${OBSERVABILITY_HOST}:9090"
    export RAY_GRAFANA_HOST="http://${OBSERVABILITY_HOST}:3000"
fi
DASHBOARD="--include-dashboard=false"
if [[ "${RAY_INCLUDE_DASHBOARD:-true}" != false ]]; then
    DASHBOARD="--dashboard-host=127.0.0.1 --dashboard-port=${RAY_DASHBOARD_PORT:-8265}"
fi
METRICS_PORT="${RAY_METRICS_EXPORT_PORT-8080}"
if [[ -n "${RAY_AUTOSCALING_CONFIG:-}" ]]; then
    [[ "$RAY_AUTOSCALING_CONFIG" == /* ]] || RAY_AUTOSCALING_CONFIG="$HOME/$RAY_AUTOSCALING_CONFIG"
    until [[ -f "$RAY_AUTOSCALING_CONFIG" ]]; do sleep 0.2; done
fi

# On YellowDog, when the agent aborts the task (SIGTERM) or it times out, stop Ray cleanly. On the
# local platform this script is the first process of its node's PID namespace: when it exits the
# kernel ends the rest of Ray at once, without Ray's seconds-long graceful stop.
WATCH_PID=""
trap 'exit 143' TERM
trap '[[ -z "$WATCH_PID" ]] || kill "$WATCH_PID" 2>/dev/null; [[ $$ == 1 ]] || ray stop' EXIT

ray start --head --port="${RAY_HEAD_PORT:-6379}" --ray-client-server-port="${RAY_CLIENT_PORT:-10001}" \
    --num-cpus=0 --memory=0 $DASHBOARD ${METRICS_PORT:+--metrics-export-port=$METRICS_PORT} \
    ${RAY_OBJECT_STORE_MEMORY:+--object-store-memory=$RAY_OBJECT_STORE_MEMORY} \
    --include-log-monitor="${RAY_INCLUDE_LOG_MONITOR:-true}" ${RAY_NODE_IP_ARGS:-} \
    ${RAY_AUTOSCALING_CONFIG:+--autoscaling-config="$RAY_AUTOSCALING_CONFIG"} \
    ${RAY_HEAD_ARGS:-} --block &
RAY_PID=$!
if [[ -n "${RAYDOG_DRIVERLESS_GRACE_S:-}" ]]; then
    "$(dirname "$(command -v ray)")/python3" -m prefect_raydog.scripts.driver_watch \
        "127.0.0.1:${RAY_HEAD_PORT:-6379}" $$ &
    WATCH_PID=$!
fi
wait $RAY_PID
