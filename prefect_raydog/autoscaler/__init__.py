"""The RayDog Autoscaler: a Ray node provider on YellowDog for `ray up` / `ray down`, used by
Ray's own autoscaler on the head node. In a cluster YAML:
`provider: {type: external, module: prefect_raydog.autoscaler.RayDogNodeProvider, ...}`."""

from prefect_raydog.autoscaler.provider import RayDogNodeProvider

__all__ = ["RayDogNodeProvider"]
