"""Errors raised by espmedsam; each carries the exit code the command line uses for it."""

from __future__ import annotations


class EspMedSAMError(Exception):
    """Base class of every error the library raises on purpose."""

    exit_code = 1


class ConfigError(EspMedSAMError):
    """A configuration key or value is unknown or invalid."""

    exit_code = 2


class InputError(EspMedSAMError):
    """An input tensor, image or argument does not have the expected shape or value."""

    exit_code = 2


class DataError(EspMedSAMError):
    """A dataset folder or file cannot be read or is inconsistent."""

    exit_code = 3


class CheckpointError(EspMedSAMError):
    """A checkpoint is missing, unreadable, or does not fit the model."""

    exit_code = 4


class MissingDependencyError(EspMedSAMError):
    """An optional package needed for this feature is not installed."""

    exit_code = 5


class OutputError(EspMedSAMError, OSError):
    """An output cannot be written: its folder cannot be made, it is a folder, no permission, disk full.

    An ``OSError`` too (with the ``errno`` of its cause), so code that handles failed writes still does.
    """

    exit_code = 6
