"""One error hierarchy for editstream; every message names the bad value and what was expected."""


class EditstreamError(Exception):
    """Base class of every error editstream raises on purpose."""


class ConfigError(EditstreamError, ValueError):
    """A configuration mapping has unknown, missing or badly typed keys."""


class MissingPackageError(EditstreamError, ImportError):
    """An optional package is not installed; the message says which command installs it."""


class DataFormatError(EditstreamError, ValueError):
    """A data file is not one of the known benchmark formats."""


class InvalidEditError(EditstreamError, ValueError):
    """A fact event or edit request fails validation (the reason is the message)."""


class ArtifactError(EditstreamError, ValueError):
    """An artifact is malformed, from another method, or for another base model."""


class UnknownMethodError(EditstreamError, KeyError):
    """No editing method is registered under the given name."""


class OrderError(EditstreamError, RuntimeError):
    """An artifact arrived out of `seq` order at a replica."""


class NotReadyError(EditstreamError, RuntimeError):
    """A replica was asked before it replayed the journal (it would answer from an old state)."""
