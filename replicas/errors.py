"""Errors that cross process boundaries (engine replica -> ingress), importable without torch."""


class EngineDeadError(RuntimeError):
    """The step loop has stopped; the replica must be replaced."""


class ModelLoadError(RuntimeError):
    """The model cannot be found, converted or served by this engine."""


class EngineStepError(RuntimeError):
    """The engine step running this request failed; the request is over, the engine is not."""
