"""Strategy lookup by name: a built-in, or `module:Class` for the user's own."""
from __future__ import annotations

import importlib
from typing import Any

from strategies.base import QueryStrategy
from strategies.random import RandomStrategy

BUILTINS: dict[str, type] = {"random": RandomStrategy}


def load_strategy(name: str, params: dict[str, Any]) -> QueryStrategy:
    """Instantiate the strategy a job names; errors name the strategy and the fix."""
    if name in BUILTINS:
        cls = BUILTINS[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"strategy '{name}' cannot be loaded ({e}). Fix: check that module "
                             f"'{module}' is importable and defines '{attr}'") from None
    else:
        raise ValueError(f"unknown strategy '{name}'. Fix: use one of {sorted(BUILTINS)} or 'module:Class'")
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"strategy '{name}': bad parameters {params} ({e}). Fix: check the names under "
                         "strategy.params in the job file") from None
