#!/bin/bash
# RayDog node userdata for a base Ubuntu image with the YellowDog agent: runs as root at boot and
# creates the Python venv that head.sh and worker.sh activate (RAYDOG_VENV), with the driver's
# Python minor version and the driver's versions of Ray, Prefect, prefect-raydog and the flow's
# own packages. `prefect-raydog node-requirements --userdata [PACKAGE...]` prints this script
# with PYTHON_VERSION and REQUIREMENTS filled in from the driver's environment. Packages come
# from PyPI, or from the mirror that the image's PIP_INDEX_URL and UV_DEFAULT_INDEX name.
set -euo pipefail
RAYDOG_VENV=/opt/yellowdog/agent/venv
PYTHON_VERSION="3.11"
REQUIREMENTS=$(cat <<'END_OF_REQUIREMENTS'
ray[client,default]==2.60.0
prefect
prefect-raydog
END_OF_REQUIREMENTS
)

# An image whose Python can make venvs needs nothing from apt (nor a way to its mirror).
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -yq python3-venv python3-pip
fi

# uv makes the venv with PYTHON_VERSION, fetching that Python when the image has another one;
# it lives under /opt so that yd-agent, who runs the node's tasks, can read it.
export UV_PYTHON_INSTALL_DIR=/opt/yellowdog/python
python3 -m venv /opt/yellowdog/uv
/opt/yellowdog/uv/bin/pip install -q uv
/opt/yellowdog/uv/bin/uv venv -q --python "$PYTHON_VERSION" "$RAYDOG_VENV"
printf '%s\n' "$REQUIREMENTS" > /opt/yellowdog/node-requirements.txt
/opt/yellowdog/uv/bin/uv pip install -q --python "$RAYDOG_VENV/bin/python" \
    -r /opt/yellowdog/node-requirements.txt
chown -R yd-agent:yd-agent "$RAYDOG_VENV"
