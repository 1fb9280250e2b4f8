"""Argument checks shared by the whole package (in the spirit of ``sklearn.utils.validation``).

A low module: it imports only :mod:`lens_safety.core.errors`, numpy and the standard library (never
torch: the judges and prompt modules that use it stay light), so every other module can use it. Each
check raises the project's error class with a message that
names the argument, what was expected, what was found and, where given, what it means.

>>> check_int(3, "batch_size", low=1)
3
>>> check_int(True, "batch_size", low=1)
Traceback (most recent call last):
    ...
lens_safety.core.errors.InputError: batch_size must be an integer >= 1, got True.
>>> check_number(0.5, "threshold", low=0, high=1, inclusive=(False, False))
0.5
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import numpy as np

from .errors import InputError, ModelMismatchError, NonFiniteActivationError

__all__ = ["check_int", "check_number", "check_finite", "check_same_model", "config_from_options",
           "DEFAULT_NONFINITE_HINT"]

ConfigT = TypeVar("ConfigT")

#: The fix :func:`check_finite` suggests unless told otherwise.
DEFAULT_NONFINITE_HINT = ("The model's forward pass probably overflowed (half precision? load the model with "
                          "dtype=torch.float32) or the inputs are corrupted.")


def _range_text(kind: str, low: Any, high: Any, inclusive: tuple[bool, bool] | None = None) -> str:
    """``inclusive=None``: integer bounds, written ``low..high``; else an interval ``(low, high]``."""
    if low is not None and high is not None:
        if inclusive is None:
            return f"{kind} in {low}..{high}"
        lo, hi = ("[" if inclusive[0] else "("), ("]" if inclusive[1] else ")")
        return f"{kind} in {lo}{low}, {high}{hi}"
    inclusive = inclusive or (True, True)
    if low is not None:
        return f"{kind} {'>=' if inclusive[0] else '>'} {low}"
    if high is not None:
        return f"{kind} {'<=' if inclusive[1] else '<'} {high}"
    return kind


def _fail(name: str, expected: str, allow_none: bool, hint: str, value: Any) -> InputError:
    none = " or None" if allow_none else ""
    why = f" ({hint})" if hint else ""
    return InputError(f"{name} must be {expected}{none}{why}, got {value!r}.")


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None,
              allow_none: bool = False, hint: str = "", kind: str = "an integer") -> int | None:
    """Return ``value`` as an ``int`` in ``low..high`` (both inclusive), else raise :class:`InputError`.

    ``bool`` is refused (``True`` is not a count); numpy integers are accepted. ``hint`` says what
    the number means and goes into the message; ``kind`` names the expected thing ("a layer").
    ``allow_none=True`` lets ``None`` through.

    >>> check_int(np.int64(2), "layer", low=0, high=3)
    2
    >>> check_int(None, "n", low=1, allow_none=True) is None
    True
    >>> check_int(9, "top_k", low=1, high=5, hint="the vocabulary size")
    Traceback (most recent call last):
        ...
    lens_safety.core.errors.InputError: top_k must be an integer in 1..5 (the vocabulary size), got 9.
    """
    if value is None and allow_none:
        return None
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
            or (low is not None and value < low) or (high is not None and value > high)):
        raise _fail(name, _range_text(kind, low, high), allow_none, hint, value)
    return int(value)


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 inclusive: tuple[bool, bool] = (True, True), allow_none: bool = False,
                 hint: str = "", kind: str = "a finite number") -> float | None:
    """Return ``value`` as a finite ``float`` within the bounds, else raise :class:`InputError`.

    ``inclusive`` says whether ``low`` and ``high`` themselves are allowed; ``bool``, strings,
    NaN and infinities are refused; ``hint`` and ``kind`` as in :func:`check_int`.

    >>> check_number(2, "lr", low=0, inclusive=(False, True))
    2.0
    >>> check_number(float("nan"), "coeff")
    Traceback (most recent call last):
        ...
    lens_safety.core.errors.InputError: coeff must be a finite number, got nan.
    """
    if value is None and allow_none:
        return None
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Real) and np.isfinite(value)
    if ok and low is not None:
        ok = value >= low if inclusive[0] else value > low
    if ok and high is not None:
        ok = value <= high if inclusive[1] else value < high
    if not ok:
        raise _fail(name, _range_text(kind, low, high, inclusive), allow_none, hint, value)
    return float(value)


def _first_bad(x: Any) -> tuple[int, tuple[int, ...]] | None:
    """(count, index of the first) of the NaN/inf entries of an array or tensor; None if all finite."""
    torch = sys.modules.get("torch")  # not imported here: a tensor exists only once torch is loaded
    if torch is not None and isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.is_complex()):
            return None
        bad = ~torch.isfinite(x.detach())
        n = int(bad.sum())
        if not n:
            return None
        flat = int(bad.flatten().to(torch.uint8).argmax())
        shape = tuple(x.shape)
    else:
        a = np.asarray(x)
        if a.dtype.kind not in "fc":
            return None
        bad = ~np.isfinite(a)
        n = int(bad.sum())
        if not n:
            return None
        flat = int(bad.argmax())
        shape = a.shape
    return n, tuple(int(i) for i in np.unravel_index(flat, shape))


def check_finite(x: Any, what: str, *, hint: str = DEFAULT_NONFINITE_HINT,
                 where: Callable[[list[tuple]], str] | None = None) -> None:
    """Raise :class:`~lens_safety.core.errors.NonFiniteActivationError` if ``x`` holds NaN or inf.

    ``x``: a tensor or an array, or a mapping ``label -> tensor/array`` (each is checked; the
    message then names every bad label). ``what`` names the values ("The donor state at layer 3").
    ``where`` turns the list of first bad locations (one index tuple, or ``(label, *index)`` per
    bad entry of a mapping) into the location phrase; by default the first index is given.
    Integer and boolean values are always finite.

    >>> import torch
    >>> check_finite(torch.tensor([[1.0, float("nan")]]), "The scores", hint="Recompute them.")
    Traceback (most recent call last):
        ...
    lens_safety.core.errors.NonFiniteActivationError: The scores: 1 NaN/inf value(s), the first at index (0, 1). \
Recompute them.
    >>> check_finite({3: np.ones(2), 5: np.array([np.inf])}, "The activations", hint="",
    ...              where=lambda bad: f"at layer(s) {[b[0] for b in bad]}")
    Traceback (most recent call last):
        ...
    lens_safety.core.errors.NonFiniteActivationError: The activations: 1 NaN/inf value(s), at layer(s) [5].
    """
    items = x.items() if isinstance(x, Mapping) else [(None, x)]
    n, bad = 0, []
    for label, v in items:
        found = _first_bad(v)
        if found is not None:
            n += found[0]
            bad.append(found[1] if label is None else (label, *found[1]))
    if not bad:
        return
    loc = where(bad) if where is not None else f"the first at {'index' if len(bad[0]) else 'the value'} {bad[0]}"
    raise NonFiniteActivationError(f"{what}: {n} NaN/inf value(s), {loc}." + (f" {hint}" if hint else ""))


def _hash_and_name(x: Any) -> tuple[str, str]:
    h = getattr(x, "weights_hash", None) or ""
    name = getattr(x, "model_name", None) or getattr(x, "name", None) or "?"
    return str(h), str(name)


def check_same_model(a: Any, b: Any, what: str, *, fix: str = "Recompute one of them with the other's model.") -> None:
    """Raise :class:`~lens_safety.core.errors.ModelMismatchError` if ``a`` and ``b`` come from different model weights.

    ``a`` and ``b``: anything with ``weights_hash`` and ``model_name`` (results, residuals, pairs)
    or ``name`` (a model). An empty or missing ``weights_hash`` (unknown origin) passes. ``what``
    says what was attempted ("Cannot concat residuals"); ``fix`` how to repair it.

    >>> from types import SimpleNamespace as NS
    >>> check_same_model(NS(weights_hash="a" * 64, model_name="m1"), NS(weights_hash="b" * 64, model_name="m2"),
    ...                  "Cannot compare results")
    Traceback (most recent call last):
        ...
    lens_safety.core.errors.ModelMismatchError: Cannot compare results: they come from different models, m1 (weights \
aaaaaaaaaaaa) and m2 (weights bbbbbbbbbbbb). Recompute one of them with the other's model.
    """
    (ha, na), (hb, nb) = _hash_and_name(a), _hash_and_name(b)
    if ha and hb and ha != hb:
        raise ModelMismatchError(f"{what}: they come from different models, {na} (weights {ha[:12]}) and {nb} "
                                 f"(weights {hb[:12]}). {fix}")


def config_from_options(cls: type[ConfigT], config: ConfigT | None, options: Mapping[str, Any], *, function: str,
                        error: type[Exception] = TypeError, names: Collection[str] | None = None) -> ConfigT:
    """The config object of a call that takes ``config=`` and keyword ``options``: ``config`` (``None``: the
    defaults, ``cls()``) with the ``options`` replacing its fields (:func:`dataclasses.replace`).

    ``cls`` is a dataclass; ``function`` names the caller in the messages. A ``config`` of another type
    raises ``TypeError``; an option outside ``names`` (default: the fields of ``cls``) raises ``error``
    naming it and listing the valid ones. Names in ``names`` that are not fields of ``cls`` are accepted
    and left for the caller to apply.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Sampling:
    ...     n: int = 8
    ...     seed: int = 0
    >>> config_from_options(Sampling, Sampling(n=4), {"seed": 1}, function="run")
    Sampling(n=4, seed=1)
    >>> config_from_options(Sampling, None, {"sed": 1}, function="run")
    Traceback (most recent call last):
        ...
    TypeError: run() got unknown argument(s) 'sed'; valid options: n, seed.
    >>> config_from_options(Sampling, {"n": 4}, {}, function="run")
    Traceback (most recent call last):
        ...
    TypeError: run(): config must be a Sampling, got dict.
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    valid = list(fields if names is None else names)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise error(f"{function}() got unknown argument(s) {', '.join(map(repr, unknown))}; "
                    f"valid options: {', '.join(valid)}.")
    if config is None:
        config = cls()
    elif not isinstance(config, cls):
        raise TypeError(f"{function}(): config must be a {cls.__name__}, got {type(config).__name__}.")
    own = {k: v for k, v in options.items() if k in fields}
    return dataclasses.replace(config, **own) if own else config
