"""Errors that cross process boundaries (engine replica -> ingress), importable without torch."""


class EngineDeadError(RuntimeError):
    """The step loop has stopped; the replica must be replaced.

    `replica_id` names the replica whose engine died, when known, so that the router can stop
    sending it work before Serve's next health check.
    """

    def __init__(self, message: str, replica_id: str | None = None) -> None:
        super().__init__(message)
        self.replica_id = replica_id

    def __reduce__(self):
        return type(self), (str(self), self.replica_id)


class ModelLoadError(RuntimeError):
    """The model cannot be found, converted or served by this engine."""


class EngineStepError(RuntimeError):
    """The engine step running this request failed; the request is over, the engine is not."""
