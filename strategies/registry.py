"""Strategy lookup: a built-in name, 'module:Class', 'path/to/file.py:Class', or an installed entry point."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strategies.base import QueryStrategy, StrategyError
from strategies.params import check_params
from strategies.select import check_declared

ENTRY_POINT_GROUP = "freeal_stream.strategies"
# Imported only when named: `uncertainty` pulls in modAL (and, through it, torch when installed).
BUILTINS: dict[str, str] = {
    "random": "strategies.random:RandomStrategy",
    "uncertainty": "strategies.uncertainty:UncertaintyStrategy",
    "route": "strategies.uncertainty:RouteStrategy",
    "diversity": "strategies.diversity:DiversityStrategy",
    "hybrid": "strategies.hybrid:HybridStrategy",
    "disagreement": "strategies.disagreement:DisagreementStrategy",
}


def load_strategy(name: str, params: Mapping[str, Any] | None = None) -> QueryStrategy:
    """Instantiate the strategy a job names, its params checked first; every error names the strategy."""
    params = dict(params or {})
    cls = resolve(name)
    check_params(name, cls, params)
    try:
        strategy = cls(**params)
    except (TypeError, ValueError) as e:
        raise StrategyError(name, f"bad parameters {params}: {e}") from None
    check_declared(strategy)
    return strategy


def resolve(name: str) -> type[QueryStrategy]:
    """The class `name` stands for (see the module docstring); built-ins win over entry points."""
    if name in BUILTINS:
        return _import(name, BUILTINS[name])
    if ":" in name:
        return _import(name, name)
    found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if found:
        try:
            return _checked_class(name, found[0].load())
        except Exception as e:
            raise StrategyError(
                name, f"entry point {found[0].value} cannot be loaded ({type(e).__name__}: {e})"
            ) from None
    installed = sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    raise StrategyError(
        name,
        f"unknown strategy. Fix: use a built-in ({', '.join(BUILTINS)}), 'module:Class', "
        f"'path/to/file.py:Class', or an installed '{ENTRY_POINT_GROUP}' entry point"
        + (f" ({', '.join(installed)})" if installed else " (none installed)"),
    )


def _import(name: str, target: str) -> type[QueryStrategy]:
    where, _, attr = target.rpartition(":")
    try:
        module = _load_file(Path(where)) if where.endswith(".py") else importlib.import_module(where)
    except Exception as e:
        raise StrategyError(
            name,
            f"cannot import '{where}' ({type(e).__name__}: {e}). Fix: check that it is "
            "importable (on PYTHONPATH, or a path to a .py file)",
        ) from None
    if not hasattr(module, attr):
        raise StrategyError(name, f"'{where}' defines no '{attr}'")
    return _checked_class(name, getattr(module, attr))


def _load_file(path: Path) -> Any:
    """Import a .py file as a module of its own, under a name unique to its absolute path."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such file {path}")
    module_name = f"freeal_user_strategy_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a .py path always has a source loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _checked_class(name: str, obj: Any) -> type[QueryStrategy]:
    if not (isinstance(obj, type) and issubclass(obj, QueryStrategy)):
        raise StrategyError(name, f"{obj!r} is not a subclass of strategies.base.QueryStrategy")
    return obj
