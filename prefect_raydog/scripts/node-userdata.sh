#!/bin/bash
# RayDog node userdata for a base Ubuntu image with the YellowDog agent: runs as root at boot and
# creates the Python venv with Ray that head.sh and worker.sh activate (RAYDOG_VENV).
# Edit RAY_VERSION / EXTRA_PACKAGES to match the Ray version and libraries of your driver.
set -euo pipefail
RAYDOG_VENV=/opt/yellowdog/agent/venv
RAY_VERSION="2.60.0"
EXTRA_PACKAGES=""

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -yq python3-venv python3-pip curl

python3 -m venv "$RAYDOG_VENV"
"$RAYDOG_VENV/bin/pip" install -q --upgrade pip
"$RAYDOG_VENV/bin/pip" install -q "ray[default,client]==${RAY_VERSION}" ${EXTRA_PACKAGES}
chown -R yd-agent:yd-agent "$RAYDOG_VENV"
