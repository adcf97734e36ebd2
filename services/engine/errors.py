"""The engine's error types: every user mistake surfaces as one of these, with one clear line."""


class EngineError(Exception):
    """Base of all errors the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot run as given (bad prompt, sampling parameters, lengths)."""


class ModelLoadError(EngineError):
    """A model directory that cannot be loaded: missing, truncated, or an unsupported model."""
