"""Check a job's `strategy.params` against the strategy class's __init__ before anything runs."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from strategies.base import StrategyError

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def check_params(strategy: str, cls: type, params: Mapping[str, Any]) -> None:
    """Unknown or missing names, and values that do not fit the annotation, raise a StrategyError naming
    `strategy` and the parameter. Value checks beyond types are the class's own (its __init__ raises)."""
    sig = inspect.signature(cls)
    named = {p.name: p for p in sig.parameters.values() if p.kind in _NAMED}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    for key in params:
        if key not in named and not open_ended:
            allowed = f"one of {sorted(named)}" if named else "none (it takes no parameters)"
            raise StrategyError(strategy, f"unknown parameter '{key}'. Fix: use {allowed}")
    for p in named.values():
        if p.default is inspect.Parameter.empty and p.name not in params:
            raise StrategyError(strategy, f"missing parameter '{p.name}'. Fix: set it under strategy.params")
    try:
        hints = typing.get_type_hints(cls.__init__)  # type: ignore[misc]  # read, not called: no unsoundness
    except Exception:  # an annotation that cannot be resolved: nothing to check the values against
        hints = {}
    for key, value in params.items():
        if key in hints and not _fits(value, hints[key]):
            raise StrategyError(strategy, f"parameter '{key}' must be {_show(hints[key])}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML-loaded value fits an annotation; constructs it cannot check are accepted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, set, frozenset):
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    return not isinstance(hint, type) or isinstance(value, hint)


def _show(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_show(a) for a in args)
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
