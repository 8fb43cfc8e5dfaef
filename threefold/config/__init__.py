"""Typed configuration: one TOML file plus `--section.key=value` overrides.

Every field has a docstring; `threefold config --reference` prints them all. Anything a user can get
wrong raises `ValueError` naming the values, before any process group starts: each section's `check()`
guards its own fields, beside them (sections.py); `validate` adds the rules that cross sections
(validate.py); load.py turns TOML and override text into typed fields.
"""

from threefold.config.load import build_config, describe_fields, load_config
from threefold.config.sections import (
    ATTENTION_BACKENDS,
    DTYPE_NAMES,
    SECTIONS,
    Arch,
    AttentionBackend,
    CheckpointConfig,
    Config,
    DataConfig,
    DataSource,
    Device,
    DtypeName,
    Fp8Recipe,
    Fp8Setting,
    LoggingConfig,
    MlpBackend,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    Recompute,
    ReliabilityConfig,
    Section,
    TrainingConfig,
    check_rope_scaling,
    has_direct_grads,
)
from threefold.config.validate import MAX_MICROBATCHES, check_across_sections, check_world_size, validate

__all__ = [
    "Arch",
    "DtypeName",
    "Device",
    "Recompute",
    "AttentionBackend",
    "MlpBackend",
    "Fp8Recipe",
    "Fp8Setting",
    "DTYPE_NAMES",
    "ATTENTION_BACKENDS",
    "Section",
    "ModelConfig",
    "check_rope_scaling",
    "has_direct_grads",
    "ParallelConfig",
    "DataConfig",
    "DataSource",
    "OptimizerConfig",
    "TrainingConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "ReliabilityConfig",
    "Config",
    "SECTIONS",
    "MAX_MICROBATCHES",
    "build_config",
    "check_across_sections",
    "check_world_size",
    "describe_fields",
    "load_config",
    "validate",
]
