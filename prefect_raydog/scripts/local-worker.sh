#!/bin/bash
# RayDog worker node task for a process node of the local platform (run unchanged by its agent).
# Variables (task environment):
#   RAY_HEAD_IP       the head node's private address (set by the Builder; required).
#   RAYDOG_VENV       Python venv with Ray, activated when set (the Builder fills it in);
#                     otherwise `ray` is taken from PATH.
#   RAY_NODE_IP_ARGS  address flags; "--node-ip-address=127.0.0.1" on loopback nodes.
#   RAY_HEAD_PORT     the head's GCS port (default 6379).
#   RAY_NUM_CPUS      CPUs this node offers to Ray tasks (default 1).
#   RAY_RESOURCES     custom resources as JSON, e.g. '{"gpu-pool": 1}', so a pool's nodes can be
#                     told apart (default none).
#   RAY_WORKER_ARGS   extra `ray start` arguments.
set -euo pipefail
RAYDOG_VENV="${RAYDOG_VENV:-}"
if [[ -n "$RAYDOG_VENV" ]]; then
    source "$RAYDOG_VENV/bin/activate"
fi

# Ray is unreliable here without these (see local-head.sh); a worker whose head is gone gives up
# after 5 s instead of 60.
export RAY_AUTH_MODE=disabled GRPC_ENABLE_FORK_SUPPORT=0 RAY_USAGE_STATS_ENABLED=0
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_gcs_rpc_server_reconnect_timeout_s=5
# A machine that dies sends no FIN or RST: without a short gRPC keepalive, a task that was running
# on it stays pending for Ray's default keepalive (5 min + 2 min) before its owner gives up.
export RAY_grpc_client_keepalive_time_ms=10000 RAY_grpc_client_keepalive_timeout_ms=10000

# This script is the first process of the node's own PID namespace: when it exits, the kernel
# kills whatever of Ray is left on the node at once. So when the agent aborts the task (SIGTERM
# to its process group) it exits without waiting seconds for Ray's graceful stop.
trap 'exit 143' TERM

ray start --address="${RAY_HEAD_IP:?RAY_HEAD_IP is set by the RayDog Builder}:${RAY_HEAD_PORT:-6379}" \
    --num-cpus="${RAY_NUM_CPUS:-1}" --object-store-memory=100000000 --include-log-monitor=false \
    ${RAY_RESOURCES:+--resources="$RAY_RESOURCES"} ${RAY_NODE_IP_ARGS:-} ${RAY_WORKER_ARGS:-} \
    --block &
wait $!
