#!/bin/bash
# RayDog head node task for a YellowDog node booted from a base Ubuntu image with node-userdata.sh.
# Variables (task environment): RAYDOG_VENV (Python venv with Ray; default below),
# OBSERVABILITY_HOST (set by the Builder when the cluster has an observability node),
# RAY_HEAD_ARGS (extra `ray start` arguments). The task runner sets RAYDOG_DRIVERLESS_GRACE_S and
# RAYDOG_FIRST_DRIVER_WITHIN_S: the task ends once no Ray driver has been connected for that long
# (driver_watch.py, which needs prefect-raydog in the venv, as the runner's tasks do).
set -euo pipefail
RAYDOG_VENV="${RAYDOG_VENV:-/opt/yellowdog/agent/venv}"
source "$RAYDOG_VENV/bin/activate"

# A machine that dies sends no FIN or RST: without a short gRPC keepalive, a task that was running
# on it stays pending for Ray's default keepalive (5 min + 2 min) before its owner gives up.
export RAY_grpc_client_keepalive_time_ms=10000 RAY_grpc_client_keepalive_timeout_ms=10000

# When YellowDog aborts the task (SIGTERM) or it times out, stop Ray cleanly.
WATCH_PID=""
trap 'exit 143' TERM
trap '[[ -z "$WATCH_PID" ]] || kill "$WATCH_PID" 2>/dev/null; ray stop' EXIT

if [[ -n "${OBSERVABILITY_HOST:-}" ]]; then
    export RAY_PROMETHEUS_HOST="http://${OBSERVABILITY_HOST}:9090"
    export RAY_GRAFANA_HOST="http://${OBSERVABILITY_HOST}:3000"
fi

ray start --head --port=6379 --ray-client-server-port=10001 \
    --dashboard-host=0.0.0.0 --dashboard-port=8265 --metrics-export-port=8080 \
    --num-cpus=0 ${RAY_HEAD_ARGS:-} --block &
RAY_PID=$!
if [[ -n "${RAYDOG_DRIVERLESS_GRACE_S:-}" ]]; then
    python3 -m prefect_raydog.scripts.driver_watch "127.0.0.1:6379" $$ &
    WATCH_PID=$!
fi
wait $RAY_PID
