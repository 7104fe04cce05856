"""Architectures by name.

An architecture is an `nn.Module` class for a stack of runs, with a `config_class` attribute (its
dataclass config). Built-in ones register themselves on import; users register their own from their
own module with the same decorator:

    from trainer.registry import register_architecture

    @register_architecture("my_sae")
    class MySAE(torch.nn.Module):
        config_class = MyConfig
        ...
"""

from __future__ import annotations

from typing import Callable, TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T", bound=type)

_REGISTRY: dict[str, type] = {}

# Imported lazily by `get_architecture` / `registered_architectures` so that the built-ins are
# always known, without a circular import (those modules import this one to register).
_BUILTIN_MODULES = ("trainer.sae_standard", "trainer.sae_topk", "trainer.sae_batchtopk", "trainer.sae_jumprelu",
                    "trainer.sae_gated", "trainer.sae_matryoshka")


def register_architecture(name: str, *, replace: bool = False) -> Callable[[T], T]:
    """Class decorator: make the class available as `get_architecture(name)`.

    Registering a different class under a taken name is an error unless `replace=True` (a silent
    override would make a config train something other than what it names)."""
    if not isinstance(name, str) or not name:
        raise PipelineError(f"architecture name must be a non-empty string, got {name!r}")

    def decorator(cls: T) -> T:
        old = _REGISTRY.get(name)
        if old is not None and old is not cls and not replace:
            raise PipelineError(
                f"architecture {name!r} is already registered (by {old.__module__}.{old.__qualname__}); "
                f"pick another name or pass replace=True")
        _REGISTRY[name] = cls
        cls.architecture_name = name  # what a saved config will say
        return cls

    return decorator


def _import_builtins() -> None:
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def registered_architectures() -> list[str]:
    """The registered names, sorted."""
    _import_builtins()
    return sorted(_REGISTRY)


def get_architecture(name: str) -> type:
    """The class registered as `name`; an unknown name is a PipelineError listing the known ones."""
    _import_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PipelineError(
            f"unknown architecture {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None
