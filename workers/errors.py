"""Exceptions raised by the workers package; every one derives from :class:`WorkerError`."""

from __future__ import annotations


class WorkerError(Exception):
    """Root of every error the worker side raises."""


class ConfigError(WorkerError):
    """A worker setting or CLI option is invalid."""
