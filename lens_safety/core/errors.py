"""Errors raised at the public boundary.

Every error is a :class:`LensSafetyError` and also inherits the builtin that a caller
would naturally catch (``ValueError``, ``KeyError``, ``FileNotFoundError``...). Messages
say what was expected, what was found, and how to fix it.
"""

from __future__ import annotations


class LensSafetyError(Exception):
    """Base class of every error lens_safety raises on purpose."""


class UnknownNameError(LensSafetyError, KeyError):
    """A model, prompt set, jailbreak method or asset name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AssetError(LensSafetyError, RuntimeError):
    """A pinned artifact could not be fetched, or failed its sha256 check."""


class OfflineError(AssetError, ConnectionError):
    """Nothing cached and the package index cannot be reached."""


class InputError(LensSafetyError, ValueError):
    """Bad input from the caller: empty, wrong shape, wrong type, out of range."""


class ModelMismatchError(InputError):
    """Data made with one model (or tokenizer) handed to another."""


class NonFiniteActivationError(InputError, FloatingPointError):
    """Activations, scores or other computed values hold NaN or inf (usually a float16 overflow)."""


class ChatTemplateError(InputError):
    """Chat formatting asked of a model without a chat template."""


class PromptTooLongError(InputError):
    """A formatted prompt is longer than the model's context."""


class CacheError(LensSafetyError, OSError):
    """A cache entry is unreadable or does not match its key (it will be rebuilt)."""


class NotFittedError(LensSafetyError, AttributeError):
    """A fitted-state attribute was used before ``fit``."""


class LoadGuardError(LensSafetyError, RuntimeError):
    """A load-time self-check failed (bridge vs HF logits, vocabulary sizes)."""
