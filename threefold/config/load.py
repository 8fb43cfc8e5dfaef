"""Loading a config: TOML values and `--section.key=value` override text into typed fields."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from threefold.config.sections import (
    SECTIONS,
    Config,
    DataSource,
    Section,
    _choices,
    _field_types,
    _unknown_choice,
    _unwrap_optional,
)
from threefold.config.validate import validate
from threefold.presets import MODEL_PRESETS

# --- Loading: TOML values and override text into typed fields ---------------------------------------


def _from_toml(value: Any, base: type) -> Any:
    """A TOML value as the file typed it: a quoted number is a mistake, not a number."""
    if isinstance(value, bool) != (base is bool):  # bool is an int to isinstance
        raise ValueError
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, base):
        raise ValueError
    return value


def _from_text(text: str, base: type) -> Any:
    """An override's text (always a string) parsed as the field's type."""
    if base is not bool:
        return base(text)
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError


def _coerce(where: str, value: Any, hint: Any, *, text: bool) -> Any:
    """Turn a TOML value (or, with `text`, an override's text) into the field's type, or raise ValueError
    naming the key, the value and the expected type."""
    base, optional = _unwrap_optional(hint)
    # TOML has no null: the strings none/null/"" are how a file or an override empties an optional key.
    if optional and (value is None or isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    if value is None:
        raise ValueError(f"{where} must not be empty")
    choices = _choices(base)
    if choices:
        return _choice(where, value, choices, text=text)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        # A number or a word (optimizer.offload_fraction: a float or 'auto'): the word when it is one.
        words = tuple(
            c for a in typing.get_args(base) if typing.get_origin(a) is Literal for c in typing.get_args(a)
        )
        if isinstance(value, str) and value.strip() in words:
            return value.strip()
        number = next(a for a in typing.get_args(base) if typing.get_origin(a) is not Literal)
        try:
            return _from_text(value, number) if text else _from_toml(value, number)
        except (TypeError, ValueError):
            raise ValueError(
                f"{where} = {value!r} is neither a {number.__name__} nor one of {words}"
            ) from None
    if typing.get_origin(base) is tuple:
        return _strings(where, value, text=text)
    try:
        return _from_text(value, base) if text else _from_toml(value, base)
    except (TypeError, ValueError):
        quoted = not text and isinstance(value, str)
        hint_text = f" (write the {base.__name__} without quotes)" if quoted else ""
        raise ValueError(f"{where} = {value!r} is not a valid {base.__name__}{hint_text}") from None


def _choice(where: str, value: Any, choices: tuple[Any, ...], *, text: bool) -> Any:
    """A value of a Literal field: one of its strings, or one of its bools (`fp8 = false`, or the override
    text false/off/0) when it has any."""
    bools = [c for c in choices if isinstance(c, bool)]
    if bools and text and value not in choices:
        try:
            value = _from_text(value, bool)
        except ValueError:
            pass
    if not isinstance(value, str) and not (bools and isinstance(value, bool)):
        raise ValueError(f"{where} = {value!r} is not a valid str")
    if value not in choices:
        raise _unknown_choice(where, value, choices)
    return value


def _strings(where: str, value: Any, *, text: bool) -> tuple[str, ...]:
    """A list of strings (logging.sample_prompts): a TOML array, or override text holding a JSON list
    (`--logging.sample_prompts='["Once", "The"]'`) or one string; () [] none or nothing: none."""
    if text and value.strip().lower() in ("", "()", "[]", "none"):
        return ()
    if text:
        try:
            value = json.loads(value) if value.lstrip().startswith("[") else [value]
        except json.JSONDecodeError:
            raise ValueError(f"{where} = {value!r} is not a JSON list of strings") from None
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} = {value!r} must be a list of strings")
    return tuple(value)


def _bool_as_int(value: Any, text: bool) -> Any:
    """true/false (TOML or override text) as 1/0, for the integer fields that once were booleans."""
    if isinstance(value, bool):
        return int(value)
    if text and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return int(value.lower() in ("true", "yes", "on"))
    return value


def _parse_override(arg: str) -> tuple[str, str, str]:
    if not arg.startswith("--") or "=" not in arg or "." not in arg.split("=", 1)[0]:
        raise ValueError(f"override {arg!r} must look like --section.key=value")
    lhs, value = arg[2:].split("=", 1)
    section, key = lhs.split(".", 1)
    return section, key, value


def _build_section(section: str, values: dict[str, tuple[Any, bool]]) -> Section:
    """One section from {key: (value, is override text)}, the model preset under its explicit keys."""
    cls = SECTIONS[section]
    hints = _field_types(cls)
    unknown = sorted(set(values) - set(hints))
    if section == "training" and "eval_batches" in unknown:
        raise ValueError(
            "training.eval_batches was replaced by training.eval_sequences, counted in sequences so that "
            "every layout scores the same tokens: write eval_batches * micro_batch_size (the old total)"
        )
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{section}]; known: {sorted(hints)}")
    kwargs = {
        k: _coerce(
            f"{section}.{k}", _bool_as_int(v, text) if k in cls.bool_as_int else v, hints[k], text=text
        )
        for k, (v, text) in values.items()
        if (section, k) != ("data", "sources")
    }
    if section == "data" and "sources" in values:
        kwargs["sources"] = _sources(*values["sources"])
    if section == "model" and kwargs.get("preset") is not None:
        # An unknown name adds nothing here; ModelConfig.check reports it.
        kwargs = {**MODEL_PRESETS.get(kwargs["preset"], {}), **kwargs}
    return cls(**kwargs)


def _sources(value: Any, text: bool) -> tuple[DataSource, ...]:
    """`[[data.sources]]` tables (a TOML array of tables) as DataSources."""
    if text and value.strip().lower() in ("", "()", "[]", "none"):
        return ()  # `--data.sources=[] --data.path=...` trains a blend's config on one dataset
    if text:
        raise ValueError(
            f"--data.sources={value}: a blend is a list of [[data.sources]] tables, set in the config file; "
            "on the command line only --data.sources=[] (no blend) is allowed"
        )
    if not isinstance(value, list | tuple) or not all(isinstance(t, dict) for t in value):
        raise ValueError(
            f"data.sources = {value!r} must be [[data.sources]] tables, each with path, weight and an "
            "optional name"
        )
    hints = _field_types(DataSource)
    sources = []
    for i, table in enumerate(value):
        unknown = sorted(set(table) - set(hints))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in data.sources[{i}]; known: {sorted(hints)}")
        if "path" not in table:
            raise ValueError(f"data.sources[{i}] needs a path")
        kwargs = {k: _coerce(f"data.sources[{i}].{k}", v, hints[k], text=False) for k, v in table.items()}
        sources.append(DataSource(**kwargs))
    return tuple(sources)


def build_config(
    raw: dict[str, Any], overrides: list[str] | None = None, *, check_paths: bool = True
) -> Config:
    """Build a Config from a TOML-like dict and `--section.key=value` overrides, then validate it."""
    merged: dict[str, dict[str, tuple[Any, bool]]] = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ValueError(f"unknown config section [{section}]; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"[{section}] must be a table of key = value pairs, got {values!r}")
        merged[section] = {k: (v, False) for k, v in values.items()}
    for arg in overrides or []:
        section, key, value = _parse_override(arg)
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r} in {arg!r}; known: {', '.join(SECTIONS)}")
        merged.setdefault(section, {})[key] = (value, True)
    sections: dict[str, Any] = {name: _build_section(name, merged.get(name, {})) for name in SECTIONS}
    config = Config(**sections)
    validate(config, check_paths=check_paths)
    return config


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, check_paths: bool = True
) -> Config:
    """Load a TOML config file (or the defaults when path is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    return build_config(raw, overrides, check_paths=check_paths)


def describe_fields() -> str:
    """Human-readable reference of every config key (used by README and `--help-config`)."""
    import ast
    import inspect

    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        docs: dict[str, str] = {}
        for prev, node in zip(body, body[1:], strict=False):
            if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr):
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    docs[prev.target.id] = node.value.value  # type: ignore[union-attr]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(f"  {f.name} = {default!r}  # {docs.get(f.name, '')}")
    return "\n".join(lines)
