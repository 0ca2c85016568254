"""Exceptions raised for bad inputs and bad checkpoints. Each message names the problem."""

from __future__ import annotations


class OnePeaceError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(OnePeaceError, ValueError):
    """An input (text, image, audio, tensor) cannot be used; the message says which one and why."""


class CheckpointError(OnePeaceError, ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the file, key or shape."""


class MissingDependencyError(OnePeaceError, ImportError):
    """An optional dependency is needed for this call; the message names the pip extra to install."""


class OnePeaceWarning(UserWarning):
    """A warning of this package (the command line prints these, one line each, and hides other libraries')."""


def require(module: str, extra: str):
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``pip install 'onepeace[extra]'``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is required for this; install it with: pip install 'onepeace[{extra}]'"
        ) from exc
