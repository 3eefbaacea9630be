"""Typed failures of the control plane (the CLI prints them as one line)."""

from __future__ import annotations


class ControlPlaneError(Exception):
    """Base of expected control-plane failures."""


class UnknownWorker(ControlPlaneError):
    pass


class NotLeader(ControlPlaneError):
    """This manager lost its leadership lock (connection gone); it must stop acting."""


class KafkaUnavailable(ControlPlaneError):
    pass
