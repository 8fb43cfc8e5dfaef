"""Fuzzing the config: any value in any key, from a file or an override, gives a Config or a ValueError.

Never a TypeError, an OverflowError or a silent acceptance of something validation should refuse: every
accepted config passes `validate` again. Seeded, so a failure reproduces; a few thousand cases in a second.
"""

import dataclasses
import math
import random

import pytest

from threefold.config import SECTIONS, Config, build_config, validate

VALUES = [
    0, 1, -1, 2, 3, 7, 64, 2**31, 2**63, 10**30, -(2**40), 0.0, 0.5, -0.5, 1e-12, 1e300, math.inf, -math.inf,
    math.nan, True, False, "", "x", "none", "true", "1f1b", "llama", "bfloat16", "../..", "/etc/passwd",
    "5", "1e3", "0x10", " 4", "\x00", "é", [], [1, 2], ["a"], {}, {"a": 1},
]  # fmt: skip
TEXTS = ["", "0", "-1", "1e400", "nan", "inf", "true", "yes", "none", "null", "[1]", "{}", "2**32", "9" * 40]


def _fields() -> list[tuple[str, str]]:
    return [(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _check(make) -> Config | None:
    try:
        config = make()
    except ValueError as e:
        assert str(e), "an error must say what is wrong"
        return None
    validate(config, check_paths=False)  # whatever was accepted is valid
    return config


@pytest.mark.parametrize("seed", range(4))
def test_random_file_values_give_a_config_or_a_value_error(seed):
    rng = random.Random(seed)
    fields = _fields()
    accepted = 0
    for _ in range(400):
        raw: dict[str, dict] = {}
        for section, key in rng.sample(fields, rng.randint(1, 3)):
            raw.setdefault(section, {})[key] = rng.choice(VALUES)
        accepted += _check(lambda raw=raw: build_config(raw, check_paths=False)) is not None
    assert accepted < 400  # the loop did reach validation's refusals


@pytest.mark.parametrize("seed", range(2))
def test_random_override_text_gives_a_config_or_a_value_error(seed):
    rng = random.Random(100 + seed)
    fields = _fields()
    for _ in range(400):
        overrides = [
            f"--{section}.{key}={rng.choice(TEXTS + [str(v) for v in VALUES])}"
            for section, key in rng.sample(fields, rng.randint(1, 3))
        ]
        _check(lambda overrides=overrides: build_config({}, overrides, check_paths=False))


def test_malformed_structure_is_refused_clearly():
    for raw in ({"model": 3}, {"model": [1]}, {"nonsense": {}}, {"model": {"nonsense": 1}}):
        with pytest.raises(ValueError):
            build_config(raw, check_paths=False)  # type: ignore[arg-type]
    for bad in ("--model", "--model.", "--.x=1", "model.hidden_size=4", "--model.hidden_size"):
        with pytest.raises(ValueError):
            build_config({}, [bad], check_paths=False)
