"""Errors that carry a message for the user: what is wrong, which setting, what to do (no heavy imports)."""


class DatasetError(ValueError):
    """A dataset cannot be used; the message says which and what to do."""


class RunFailed(RuntimeError):
    """The run cannot go on (too few usable nodes); the message gives every node's reason."""


class OutputInUse(ValueError):
    """Another run holds the output folder; the message names it (PID, command) and what to do."""
