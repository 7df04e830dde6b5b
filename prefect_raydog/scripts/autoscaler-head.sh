#!/bin/bash
# RayDog Autoscaler head node task: waits for `ray up` to upload the autoscaling config, then
# starts Ray's head with Ray's autoscaler (the monitor) using it and RayDogNodeProvider.
# Variables (task environment, all optional):
#   RAYDOG_VENV     Python venv with Ray and prefect-raydog, activated when set; else PATH's `ray`.
#   RAY_HEAD_ARGS   extra `ray start` arguments.
set -euo pipefail
RAYDOG_VENV="${RAYDOG_VENV:-}"
if [[ -n "$RAYDOG_VENV" ]]; then
    source "$RAYDOG_VENV/bin/activate"
fi

# See local-head.sh: token auth, gRPC fork support and the drain wait make Ray unreliable here.
export RAY_AUTH_MODE=disabled GRPC_ENABLE_FORK_SUPPORT=0 RAY_USAGE_STATS_ENABLED=0
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
export RAY_grpc_client_keepalive_time_ms=10000 RAY_grpc_client_keepalive_timeout_ms=10000
# Ray's autoscaler looks at demand every 2 s (5 s by default): a pending task waits less
# for its node, for one YellowDog task search per update.
export AUTOSCALER_UPDATE_INTERVAL_S="${AUTOSCALER_UPDATE_INTERVAL_S:-2}"

CONFIG="$HOME/ray_bootstrap_config.yaml"
until [[ -f "$CONFIG" ]]; do sleep 0.2; done

# When the agent aborts the task (SIGTERM to its process group), stop this node's Ray.
trap "ray stop" EXIT

ray start --head --port=6379 --ray-client-server-port=10001 --num-cpus=0 --memory=0 \
    --object-store-memory=100000000 --include-dashboard=false \
    --autoscaling-config="$CONFIG" ${RAY_HEAD_ARGS:-} --block
