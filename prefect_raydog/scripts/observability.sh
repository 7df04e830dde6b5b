#!/bin/bash
# RayDog observability node task: a Prometheus server that accepts remote writes from the Ray
# nodes (they reach it through OBSERVABILITY_HOST) and that Ray's dashboard queries.
# Variables (task environment): PROMETHEUS_VERSION (default below), PROMETHEUS_ARGS (extra flags).
set -euo pipefail
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-2.53.2}"
DIR="$HOME/prometheus-${PROMETHEUS_VERSION}.linux-amd64"

if [[ ! -x "$DIR/prometheus" ]]; then
    curl -fsSL "https://github.com/prometheus/prometheus/releases/download/v${PROMETHEUS_VERSION}/prometheus-${PROMETHEUS_VERSION}.linux-amd64.tar.gz" \
        | tar -xz -C "$HOME"
fi

# When YellowDog aborts the task (SIGTERM) or it times out, stop Prometheus with it.
trap 'kill "$PROMETHEUS_PID" 2>/dev/null || true' EXIT

"$DIR/prometheus" --config.file="$DIR/prometheus.yml" --storage.tsdb.path="$HOME/prometheus-data" \
    --web.listen-address=0.0.0.0:9090 --web.enable-remote-write-receiver ${PROMETHEUS_ARGS:-} &
PROMETHEUS_PID=$!
wait "$PROMETHEUS_PID"
