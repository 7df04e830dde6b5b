#!/bin/bash
# RayDog head node task for a process node of the local platform (run unchanged by its agent).
# Variables (task environment, all optional):
#   RAYDOG_VENV       Python venv with Ray, activated when set (the Builder fills it in);
#                     otherwise `ray` is taken from PATH.
#   RAY_NODE_IP_ARGS  address flags; "--node-ip-address=127.0.0.1" on loopback nodes. Unset on
#                     bridge nodes, where Ray finds the node's own address by itself.
#   RAY_HEAD_PORT     GCS port (default 6379); RAY_CLIENT_PORT  Ray Client port (default 10001).
#   RAY_HEAD_ARGS     extra `ray start` arguments; later flags win, e.g. --include-dashboard=true.
#   RAYDOG_DRIVERLESS_GRACE_S, RAYDOG_FIRST_DRIVER_WITHIN_S  set by the task runner: the task ends
#                     once no Ray driver has been connected for that long (driver_watch.py).
# The dashboard is off by default: the project reaches Ray only through Ray Client and the GCS,
# and the dashboard costs about 190 MiB and 2-3 s of start time on a 2-core machine. No log
# monitor either (a Python process per node): task output reaches Prefect through its API.
set -euo pipefail
RAYDOG_VENV="${RAYDOG_VENV:-}"
if [[ -n "$RAYDOG_VENV" ]]; then
    source "$RAYDOG_VENV/bin/activate"
fi

# Ray is unreliable here without these: a leftover ~/.ray/auth_token turns on token auth, and
# gRPC fork support crashes about 1 in 3 Ray Client servers; draining must not wait for a dead GCS.
export RAY_AUTH_MODE=disabled GRPC_ENABLE_FORK_SUPPORT=0 RAY_USAGE_STATS_ENABLED=0
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
# A machine that dies sends no FIN or RST: without a short gRPC keepalive, a task that was running
# on it stays pending for Ray's default keepalive (5 min + 2 min) before its owner gives up.
export RAY_grpc_client_keepalive_time_ms=10000 RAY_grpc_client_keepalive_timeout_ms=10000

# This script is the first process of the node's own PID namespace: when it exits, the kernel
# kills whatever of Ray is left on the node at once. So when the agent aborts the task (SIGTERM
# to its process group) it exits without waiting seconds for Ray's graceful stop.
trap 'exit 143' TERM

ray start --head --port="${RAY_HEAD_PORT:-6379}" --ray-client-server-port="${RAY_CLIENT_PORT:-10001}" \
    --num-cpus=0 --memory=0 --object-store-memory=100000000 --include-dashboard=false \
    --include-log-monitor=false ${RAY_NODE_IP_ARGS:-} ${RAY_HEAD_ARGS:-} --block &
RAY_PID=$!
if [[ -n "${RAYDOG_DRIVERLESS_GRACE_S:-}" ]]; then
    "$(dirname "$(command -v ray)")/python3" -m prefect_raydog.scripts.driver_watch \
        "127.0.0.1:${RAY_HEAD_PORT:-6379}" $$ &
fi
wait $RAY_PID
