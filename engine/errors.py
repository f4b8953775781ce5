"""Errors the engine hands to its callers for one request. ``cause`` is a short stable label that the service maps
to an HTTP status and an error type (service/errors.py); keep the labels stable."""

from __future__ import annotations


class BatcherError(Exception):
    """Base of every error the batcher hands to its callers; ``cause`` is a short stable label."""

    cause = "error"


class EmptyInput(BatcherError):
    cause = "empty"


class InvalidInput(BatcherError):
    """Something about one input the client sent (out-of-vocabulary id, too long, ...)."""

    cause = "validation"

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class InputTooLong(InvalidInput):
    def __init__(self, index: int, n_tokens: int, max_length: int) -> None:
        super().__init__(
            f"input {index} has {n_tokens} tokens, more than the maximum of {max_length}; "
            "shorten it or set truncate=true",
            index,
        )
        self.n_tokens = n_tokens
        self.max_length = max_length


class Overloaded(BatcherError):
    cause = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(BatcherError):
    cause = "timeout"


class ShuttingDown(BatcherError):
    cause = "shutting_down"


class InferenceFailed(BatcherError):
    cause = "backend"
