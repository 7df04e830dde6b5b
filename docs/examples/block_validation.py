"""The messages docs/blocks.md shows for blocks that cannot be used: each names the field and
the reason, and is raised before anything is provisioned. Run by tests/test_docs.py."""

import os

from pydantic import ValidationError

from prefect_raydog import RayDogClusterConfig, YellowDogCredentials

HEAD = {"template_id": "yd-demo/rayhead"}
CPU = {"template_id": "yd-demo/rayworker", "name": "cpu"}
BAD_CONFIGS = [
    ({"cluster_name_prefix": "x" * 40, "head": {"template_id": " "}}, [
        "cluster_name_prefix",
        "  Value error, 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' is 40 characters long; at most 27 allowed",  # noqa: E501
        "head.template_id",
        "  Value error, must name a compute requirement template, not be blank",
    ]),
    ({"head": HEAD, "cluster_lifetime": 0}, [
        "Value error, Invalid RayDog cluster config: cluster_lifetime: must be positive, got 0:00:00",  # noqa: E501
    ]),
    ({"head": HEAD, "worker_pools": [CPU, CPU]}, [
        "Value error, Invalid RayDog cluster config: cluster: worker pool names must be unique; repeated: ['cpu']",  # noqa: E501
    ]),
    ({"head": HEAD, "worker_pools": [CPU], "workers_to_join": 3}, [
        "Value error, Invalid RayDog cluster config: cluster: workers_to_join (3) exceeds the 1 worker nodes of the worker pools",  # noqa: E501
    ]),
    ({"head": {**HEAD, "userdata": "#cloud-config"}, "ssh_tunnel": True,
      "ssh_trust_first_use": True}, [
        "Value error, head.userdata: not a shell script (no #! line), so the SSH key made for the cluster cannot be authorized in it: give ssh_private_key (a key the image or userdata authorizes), or start the userdata with #!/bin/bash",  # noqa: E501
    ]),
    ({"head": HEAD, "ssh_tunnel": True, "ssh_private_key": "KEY"}, [
        "Value error, ssh_known_hosts: required when ssh_tunnel is on: the nodes' SSH host public key (the image's /etc/ssh/ssh_host_ed25519_key.pub line) or known_hosts lines; or turn on ssh_trust_first_use to accept each node's first key",  # noqa: E501
    ]),
    ({"head": HEAD, "ssh_known_hosts": "* ssh-ed25519 AAAA!"}, [
        "Value error, ssh_known_hosts: line 1: the key is not valid base64 of an SSH public key",
    ]),
]

for fields, messages in BAD_CONFIGS:
    try:
        RayDogClusterConfig(**fields)
    except ValidationError as error:
        for message in messages:
            assert message in str(error), (message, str(error))
    else:
        raise AssertionError(f"accepted {fields}")

for name in ("YD_API_KEY_ID", "YD_API_KEY_SECRET"):
    os.environ.pop(name, None)
try:
    YellowDogCredentials().get_client()
except ValueError as error:
    assert f"ValueError: {error}" == (
        "ValueError: YellowDogCredentials: api_key_id and api_key_secret not set and not in the "
        "environment (YD_API_KEY_ID / YD_API_KEY_SECRET); fill in the block or set the variables."
    )
else:
    raise AssertionError("credentials with no key made a client")
