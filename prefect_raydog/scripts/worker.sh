#!/bin/bash
# RayDog worker node task, the same on a YellowDog node (booted with node-userdata.sh) and on the
# local platform's nodes; what differs comes through the task environment:
#   RAY_HEAD_IP        the head node's private address (set by the Builder; required).
#   RAYDOG_VENV        venv with Ray and prefect-raydog (default below; empty: PATH's `ray`).
#   RAY_NODE_IP_ARGS   address flags, e.g. "--node-ip-address=127.0.0.1"; unset: Ray finds it.
#   RAY_HEAD_PORT      the head's GCS port (6379).
#   RAY_NUM_CPUS       CPUs this node offers to Ray tasks (unset: all it has).
#   RAY_RESOURCES      custom resources as JSON, e.g. '{"gpu-pool": 1}', so a pool's nodes can be
#                      told apart (the task runner sets it).
#   RAY_METRICS_EXPORT_PORT  Prometheus metrics port (8080; empty: one Ray picks).
#   RAY_OBJECT_STORE_MEMORY  object store bytes (Ray's default share of memory when unset).
#   RAY_INCLUDE_LOG_MONITOR  "false": no log monitor.
#   RAY_WORKER_ARGS    extra `ray start` arguments.
#   RAYDOG_TOKEN_FILE  Ray's token authentication, as head.sh.
set -euo pipefail
RAYDOG_VENV="${RAYDOG_VENV-/opt/yellowdog/agent/venv}"
if [[ -n "$RAYDOG_VENV" ]]; then
    source "$RAYDOG_VENV/bin/activate"
fi

# Ray is unreliable without these (see head.sh).
export GRPC_ENABLE_FORK_SUPPORT="${GRPC_ENABLE_FORK_SUPPORT:-0}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
# A machine that dies sends no FIN or RST: without a short gRPC keepalive, a task that was running
# on it stays pending for Ray's default keepalive (5 min + 2 min) before its owner gives up.
export RAY_grpc_client_keepalive_time_ms=10000 RAY_grpc_client_keepalive_timeout_ms=10000

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
METRICS_PORT="${RAY_METRICS_EXPORT_PORT-8080}"

# Stopping Ray on exit: see head.sh.
trap 'exit 143' TERM
trap '[[ $$ == 1 ]] || ray stop' EXIT

ray start --address="${RAY_HEAD_IP:?RAY_HEAD_IP is set by the RayDog Builder}:${RAY_HEAD_PORT:-6379}" \
    ${RAY_NUM_CPUS:+--num-cpus=$RAY_NUM_CPUS} ${METRICS_PORT:+--metrics-export-port=$METRICS_PORT} \
    ${RAY_OBJECT_STORE_MEMORY:+--object-store-memory=$RAY_OBJECT_STORE_MEMORY} \
    --include-log-monitor="${RAY_INCLUDE_LOG_MONITOR:-true}" \
    ${RAY_RESOURCES:+--resources="$RAY_RESOURCES"} ${RAY_NODE_IP_ARGS:-} ${RAY_WORKER_ARGS:-} \
    --block &
wait $!
