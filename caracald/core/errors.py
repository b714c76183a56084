"""Domain errors. Each carries a message fit to show an operator as one line."""

from __future__ import annotations


class CaracalError(Exception):
    """Base of every error Caracal reports to a user instead of a traceback."""

    #: A stable, machine-readable reason an operator can look up.
    reason: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ValidationError(CaracalError):
    """Input that cannot be accepted as given."""

    reason = "invalid_input"


class NotFoundError(CaracalError):
    """A referenced record does not exist."""

    reason = "not_found"


class ConflictError(CaracalError):
    """The request contradicts what is already recorded."""

    reason = "conflict"


class CurrencyMismatchError(ValidationError):
    """Two amounts in different currencies were combined."""

    reason = "currency_mismatch"


class DelegationError(ConflictError):
    """A child's budget would exceed what its parent delegates."""

    reason = "delegation_exceeded"


class StoreUnavailableError(CaracalError):
    """The database cannot be reached."""

    reason = "store_unavailable"
