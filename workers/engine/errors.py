"""Typed engine errors. A tenant-scoped error fails only that tenant's requests."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class UnknownTenant(EngineError):
    """The loader has no delta for this tenant."""


class AdapterLoadError(EngineError):
    """The tenant's delta could not be loaded, validated or converted."""


class PoolExhausted(EngineError):
    """No free (unpinned) device slot for this tenant right now; retry later."""


class BatchError(EngineError):
    """The packed batch itself is malformed (shapes, ids out of vocabulary...)."""


class ModelLoadError(EngineError):
    """The base checkpoint directory cannot be read as a BERT-family encoder."""
