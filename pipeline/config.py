"""Config dataclasses from TOML files, with command-line values on top."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, Iterable, TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")


def load_toml(path: str | Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"config file {path} is not valid TOML: {e}") from None


def build_config(cls: type[T], config_file: str | Path | None, overrides: dict[str, Any],
                 section: str | None = None) -> T:
    """`cls` from the TOML file (its `[section]` table if present), then non-None overrides."""
    data: dict[str, Any] = {}
    if config_file:
        data = load_toml(config_file)
        if section and isinstance(data.get(section), dict):
            data = data[section]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise PipelineError(
                f"unknown field(s) {', '.join(unknown)} in {config_file}; valid fields: {', '.join(sorted(names))}"
            )
    data.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**data)


def parse_kwargs(spec: str | None, option: str = "--model-kwargs") -> dict[str, Any] | None:
    """'{"a": 1}' (JSON) or 'a=1,b=false' (values read as JSON where they parse) -> dict."""
    if not spec:
        return None
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            return json.loads(spec)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{option} is not valid JSON: {e}") from None
    out: dict[str, Any] = {}
    for item in spec.split(","):
        if "=" not in item:
            raise PipelineError(f"{option} item {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def check_sizes(cfg: Any, positive: Iterable[str] = (), non_negative: Iterable[str] = ()) -> None:
    """Refuse a config whose sizes cannot be (0 tokens, a negative batch...), naming the option.
    Fields that are None (unset, a default chosen later) pass."""
    for names, ok, words in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(cfg, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise PipelineError(f"--{name.replace('_', '-')} must be a number {words}, got {value!r}")
