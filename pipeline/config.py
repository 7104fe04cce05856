"""Config dataclasses from TOML files, with command-line values on top."""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, Iterable, TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")


def load_toml(path: str | Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 TOML") from None
    except OSError as e:  # a folder, no permission
        raise PipelineError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"config file {path} is not valid TOML: {e}") from None


def check_fields(data: dict, cls: type, where: str) -> None:
    """Refuse keys of `data` that are not fields of the dataclass `cls`, naming the nearest valid
    field of each (a typo like `dsae` for `d_sae`) and every valid one."""
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(data) - set(names))
    if not unknown:
        return
    close = {u: m[0] for u in unknown if (m := difflib.get_close_matches(u, names, n=1))}
    hint = ""
    if close:
        hint = (f" (did you mean {close[unknown[0]]}?)" if len(unknown) == 1 else
                " (did you mean " + ", ".join(f"{m} for {u}" for u, m in close.items()) + "?)")
    raise PipelineError(f"unknown field(s) {', '.join(unknown)} in {where}{hint}; valid fields: {', '.join(names)}")


def exclusive_fields(cls: type) -> tuple[tuple[str, str], ...]:
    """Pairs of fields of `cls` that say the same thing two ways (d_sae, expansion_factor): one layer
    of settings sets at most one of each, and setting one replaces the other of a lower layer."""
    return getattr(cls, "EXCLUSIVE", ())


def layer(lower: dict, upper: dict, pairs: Iterable[tuple[str, str]] = (), where: str = "") -> dict:
    """`upper`'s non-None values over `lower`; a field of an exclusive pair set in `upper` drops the
    other field from `lower` (a flag `--d-sae` beats a file's `expansion_factor`); both set in `upper`
    is refused."""
    upper = {k: v for k, v in upper.items() if v is not None}
    out = dict(lower)
    for a, b in pairs:
        if a in upper and b in upper:
            raise PipelineError(f"{where} sets both {a} and {b}; give one of them")
        for mine, other in ((a, b), (b, a)):
            if mine in upper:
                out.pop(other, None)
    out.update(upper)
    return out


def build_config(cls: type[T], config_file: str | Path | None, overrides: dict[str, Any],
                 section: str | None = None) -> T:
    """`cls` from the TOML file (its `[section]` table if present), then non-None overrides."""
    data: dict[str, Any] = {}
    pairs = exclusive_fields(cls)
    if config_file:
        data = load_toml(config_file)
        where = str(config_file)
        if section and isinstance(data.get(section), dict):
            data, where = data[section], f"[{section}] of {config_file}"
        check_fields(data, cls, where)
        data = layer({}, data, pairs, where)
    return cls(**layer(data, overrides, pairs, "the command line"))


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


def check_fraction(value: Any, option: str) -> None:
    """Refuse a fraction outside [0, 1) (a held-out share: 1 would leave nothing to train on)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise PipelineError(f"{option} must be in [0, 1), got {value!r}")


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
