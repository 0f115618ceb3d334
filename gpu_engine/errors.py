"""Exceptions raised by gpu_engine; every one derives from :class:`EngineError`."""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error gpu_engine raises."""
