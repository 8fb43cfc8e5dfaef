"""Write a config as TOML that `load_config` reads back into an equal `Config`.

A config is flat: sections of scalar keys (strings, booleans, integers, floats; lists are allowed too),
so a writer of that subset is a few lines and needs no dependency. TOML has no null: a None value is
left out, which loads back as the field's default. Every None in a resolved config is such a default
(`num_kv_heads` and `ffn_hidden_size` are filled in when the model section is built); a test holds the
round trip.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from threefold.config import Config

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_value(value: Any) -> str:
    """One value as TOML: a basic string, true/false, an integer, a float (inf and nan too), or a list."""
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # '1e-05', '3.0', 'inf', '-inf' are all TOML floats, and read back exactly
    if isinstance(value, str):
        return '"' + "".join(_escape(c) for c in value) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


def _escape(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    return _control(c)


def _control(c: str) -> str:
    """A control character as a visible escape: TOML strings and comments may not hold them raw."""
    return f"\\u{ord(c):04X}" if ord(c) < 0x20 or ord(c) == 0x7F else c


def _comment(line: str) -> str:
    return "".join(c if c == "\t" else _control(c) for c in line)


def toml_table(name: str, values: Mapping[str, Any]) -> str:
    """`[name]` and one `key = value` line per value that is not None."""
    lines = [f"[{name}]"]
    for key, value in values.items():
        if value is None:
            continue
        if not _BARE_KEY.fullmatch(key):
            raise ValueError(f"config key {key!r} cannot be written as a bare TOML key")
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def config_toml(config: Config, header: str = "") -> str:
    """The whole config, one table per section; `header` becomes leading comment lines."""
    comments = "".join(f"# {_comment(line)}\n" for line in header.splitlines())
    tables = [toml_table(section, values) for section, values in config.to_dict().items()]
    return comments + ("\n" if comments else "") + "\n".join(tables)
