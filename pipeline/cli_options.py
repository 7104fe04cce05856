"""Command-line options made from a stage's config dataclass, so that a setting's name, default and
help text are written once: in the dataclass (a field, its default, its one-line docstring).

The dataclass is read from its module's source (ast), not imported: `pipeline --help` and the
commands' parsing then need neither torch nor the stage. Every option defaults to None, so that a
`--config` TOML's value stands unless the flag is given (pipeline.config.build_config); the help
shows the dataclass's own default. Part of the face (pipeline/cli.py).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, List, Optional

import typer


@dataclass(frozen=True)
class ConfigField:
    """A dataclass field as its source gives it."""

    name: str
    annotation: str
    default: Any
    doc: str


@lru_cache(maxsize=None)
def config_fields(module: str, class_name: str) -> tuple[ConfigField, ...]:
    """The fields of dataclass `class_name` in `module`, from the source: name, annotation, default
    (a literal; `field(default_factory=...)` gives its empty value) and the docstring below it."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(open(spec.origin).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    out = []
    for i, node in enumerate(cls.body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        nxt = cls.body[i + 1] if i + 1 < len(cls.body) else None
        is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
        doc = " ".join(nxt.value.value.split()) if is_doc else ""
        out.append(ConfigField(node.target.id, ast.unparse(node.annotation), _default(node.value), doc))
    return tuple(out)


@lru_cache(maxsize=None)
def module_constant(module: str, name: str) -> Any:
    """The literal value of a module-level `NAME = ...` in `module`'s source, not imported."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(open(spec.origin).read())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == name
                                                                              for t in n.targets))
    return ast.literal_eval(node.value)


def _default(value: ast.expr | None) -> Any:
    if value is None:
        return None
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
        factory = next((k.value for k in value.keywords if k.arg == "default_factory"), None)
        return {"list": [], "dict": {}}.get(getattr(factory, "id", ""), None)
    try:
        return ast.literal_eval(value)
    except ValueError:
        return None


def config_defaults(module: str, class_name: str) -> dict[str, Any]:
    """Field name -> default, from the source."""
    return {f.name: f.default for f in config_fields(module, class_name)}


def _option_type(annotation: str) -> type:
    """The option's type for a field annotation: booleans, numbers and strings as themselves, lists of
    strings repeatable, anything else (a dict, a union of a number and a list) as a string."""
    base = [a.strip() for a in annotation.split("|") if a.strip() != "None"]
    if base == ["bool"]:
        return Optional[bool]
    if base == ["int"]:
        return Optional[int]
    if base == ["float"]:
        return Optional[float]
    if base == ["list[str]"]:
        return Optional[List[str]]
    return Optional[str]


def config_options(module: str, class_name: str, *, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
                   decls: dict[str, tuple[str, ...]] | None = None, params: dict[str, str] | None = None,
                   helps: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """Keyword parameters of a typer command, one per field of the dataclass (`only` these, in their
    order, or all but `skip`): `--field-name`, booleans as `--x/--no-x`; `decls` gives a field other
    option names, `params` another parameter name (`hooks` read as `--hook`), `helps` a help text
    that differs from the field's docstring (where the command line is not the TOML key)."""
    fields = {f.name: f for f in config_fields(module, class_name)}
    names = only if only is not None else tuple(n for n in fields if n not in skip and n.isidentifier()
                                                 and not n.isupper())
    out = []
    for name in names:
        f = fields[name]
        kind = _option_type(f.annotation)
        flag = "--" + name.replace("_", "-")
        default_decls = (f"{flag}/--no-{name.replace('_', '-')}",) if kind is Optional[bool] else (flag,)
        option = typer.Option(None, *((decls or {}).get(name, default_decls)), help=(helps or {}).get(name, f.doc))
        out.append(inspect.Parameter((params or {}).get(name, name), inspect.Parameter.KEYWORD_ONLY, default=option,
                                     annotation=kind))
    return out


def with_options(*groups: list[inspect.Parameter]) -> Callable[[Callable], Callable]:
    """Give a command taking `**options` these keyword parameters (typer reads `__signature__`)."""
    def decorate(fn: Callable) -> Callable:
        fn.__signature__ = inspect.Signature([p for group in groups for p in group])
        return fn

    return decorate
