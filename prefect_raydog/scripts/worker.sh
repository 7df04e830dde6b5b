#!/bin/bash
# RayDog worker node task for a YellowDog node booted from a base Ubuntu image with node-userdata.sh.
# Variables (task environment): RAY_HEAD_IP (set by the Builder), RAYDOG_VENV (Python venv with
# Ray; default below), RAY_RESOURCES (custom resources as JSON, e.g. '{"gpu-pool": 1}'; the
# task runner sets it so tasks can be placed on a pool), RAY_WORKER_ARGS (extra `ray start` flags).
set -euo pipefail
RAYDOG_VENV="${RAYDOG_VENV:-/opt/yellowdog/agent/venv}"
source "$RAYDOG_VENV/bin/activate"

# A machine that dies sends no FIN or RST: without a short gRPC keepalive, a task that was running
# on it stays pending for Ray's default keepalive (5 min + 2 min) before its owner gives up.
export RAY_grpc_client_keepalive_time_ms=10000 RAY_grpc_client_keepalive_timeout_ms=10000

# When YellowDog aborts the task (SIGTERM) or it times out, stop Ray cleanly.
trap "ray stop" EXIT

ray start --address="${RAY_HEAD_IP:?RAY_HEAD_IP is set by the RayDog Builder}:6379" \
    --metrics-export-port=8080 ${RAY_RESOURCES:+--resources="$RAY_RESOURCES"} \
    ${RAY_WORKER_ARGS:-} --block
