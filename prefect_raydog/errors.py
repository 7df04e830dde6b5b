"""Typed errors of the RayDog Builder; each says what failed and what was cleaned up."""

from __future__ import annotations

from collections.abc import Sequence


class RayDogError(Exception):
    """Base class of every error the Builder raises."""


class ClusterStateError(RayDogError):
    """An operation does not fit the cluster's lifecycle (e.g. build twice) or its saved state."""


class UnknownWorkerPoolError(RayDogError, KeyError):
    """No worker pool of the cluster has the given name or ID."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class HostKeyRefused(RayDogError):
    """A node presented an SSH host key that `HostKeys` does not accept; no login was tried."""


class ClusterShutdownError(RayDogError):
    """Some entities of a cluster could not be ended; they may still cost money."""

    def __init__(self, message: str, not_ended: Sequence[str]) -> None:
        super().__init__(message)
        self.not_ended = list(not_ended)

    def __reduce__(self) -> tuple:
        return type(self), (self.args[0], self.not_ended)


class ClusterBuildError(RayDogError):
    """Building the cluster (or adding a pool to it) failed; what was created has been torn down."""

    def __init__(
        self, what_failed: str, cleaned_up: Sequence[str] = (), not_cleaned_up: Sequence[str] = ()
    ) -> None:
        self.what_failed = what_failed
        self.cleaned_up = list(cleaned_up)
        self.not_cleaned_up = list(not_cleaned_up)
        super().__init__(self._message())

    def __reduce__(self) -> tuple:
        return type(self), (self.what_failed, self.cleaned_up, self.not_cleaned_up)

    def _message(self) -> str:
        parts = [self.what_failed.rstrip(".") + "."]
        if self.cleaned_up:
            parts.append("Cleaned up: " + ", ".join(self.cleaned_up) + ".")
        else:
            parts.append("Nothing had been created.")
        if self.not_cleaned_up:
            parts.append(
                "COULD NOT clean up (end these by hand or with sweep): "
                + ", ".join(self.not_cleaned_up)
                + "."
            )
        return " ".join(parts)


class KeyRefusedError(ClusterBuildError):
    """YellowDog refused the application key, so nothing could be created (or ended)."""

    def _message(self) -> str:
        made = f" Made before: {', '.join(self.not_cleaned_up)}." if self.not_cleaned_up else ""
        return (
            f"{self.what_failed.rstrip('.')}: YellowDog refused the application key; the key "
            f"ID or secret is wrong, or the key was revoked: check the credentials.{made}"
        )


class ClusterBuildTimeout(ClusterBuildError, TimeoutError):
    """The head node (or the required workers) did not start within the build timeout."""


class NodeTaskFailed(ClusterBuildError):
    """A node's Ray task ended (failed, aborted, cancelled) while the cluster was being built."""
