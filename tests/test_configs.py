"""Every example in configs/ loads and validates for its own world size, and says how to run it."""

from pathlib import Path

import pytest

from threefold.config import load_config, validate

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_the_examples_cover_the_common_cases():
    names = {p.stem for p in CONFIGS}
    assert {"tiny-cpu", "finetune-hf", "pipeline-tp-node", "multinode-zero", "long-context"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_config_validates(path):
    config = load_config(path, check_paths=False)  # data and checkpoints are the user's
    validate(config, config.world_size, check_paths=False)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert header and any(path.name in line and "threefold" in line for line in header), (
        f"{path.name} must open with a comment saying how to run it"
    )
