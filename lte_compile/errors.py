"""Exceptions of lte_compile. Each message says what was found, where, and what to do."""
from __future__ import annotations


class LTEError(Exception):
    """Base class of every error lte_compile raises on purpose."""


class ConfigError(LTEError, ValueError):
    """A configuration field has a value outside its allowed range."""

    def __init__(self, field: str, value: object, allowed: str, hint: str = ""):
        self.field, self.value, self.allowed = field, value, allowed
        msg = f"{field}={value!r} is invalid: expected {allowed}"
        super().__init__(msg + (f"; {hint}" if hint else ""))


class UnsupportedFFNError(LTEError):
    """An FFN was found but cannot be made sparse (or no FFN was found at all)."""


class StateMismatchError(LTEError):
    """Saved LTE state does not fit the model it is loaded into."""


class NotPreparedError(LTEError):
    """An LTE operation needs a model that went through `lte.prepare` first."""


class StateFileError(StateMismatchError):
    """A file of saved LTE state is missing, unreadable, corrupt or inconsistent; the message names it."""


class UnsupportedWrapperError(LTEError):
    """`lte.save` / `lte.load` got a model inside a wrapper they cannot see through (FSDP, or DDP for load)."""
