"""Exception hierarchy: every error says what went wrong, what was expected and how to fix it.

The CLI maps :class:`EmbedsearchError` to a short message and a non-zero exit code; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EmbedsearchError(Exception):
    """Base class for errors a user can act on."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class InputError(EmbedsearchError):
    """The images, folder or CSV given by the user cannot be used."""

    exit_code = 2


class EncoderError(EmbedsearchError):
    """An encoder spec is unknown, or its weights cannot be loaded."""

    exit_code = 3


class WeightsDownloadError(EncoderError):
    """Pretrained weights could not be fetched from a model hub."""


class BundleError(EmbedsearchError):
    """An index bundle is missing, incomplete, tampered with, or from another encoder."""

    exit_code = 4


class BundleMismatchError(BundleError):
    """Two artifacts disagree (another encoder, another dimension, another bundle)."""


class BundleLockedError(BundleError):
    """Another process is writing to the bundle."""

    exit_code = 5
