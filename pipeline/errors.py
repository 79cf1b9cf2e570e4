"""Typed errors a user can act on; the CLI prints their message as one line."""


class PipelineError(Exception):
    """Base class: the message says what is wrong and what to do."""

    exit_code = 1


class ConfigError(PipelineError):
    """params.yaml is missing, malformed, or holds a wrong key or value."""

    exit_code = 2


class IngestError(PipelineError):
    """A source could not be read (missing folder, unknown TFDS dataset, ...)."""


class DataValidationError(PipelineError):
    """A blocking data check failed; the validation report says which."""


class SplitError(PipelineError):
    """The accepted data cannot be split as configured."""


class GateFailed(PipelineError):
    """The model did not pass the gate; it was registered as challenger, not promoted."""


class RegistryError(PipelineError):
    """The model registry could not be read or written (not: it holds no such model or alias)."""


class StaleGate(PipelineError):
    """The champion moved after the gate compared against it; the candidate stays challenger."""
