from pathlib import Path

import pytest
import torch

from threefold.data.prepare import prepare_dataset

# One intra-op thread per process: the multi-rank tests fork several ranks onto two cores.
torch.set_num_threads(1)

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"


@pytest.fixture(scope="session")
def sonnets_dataset(tmp_path_factory) -> Path:
    """The sonnets fixture prepared with the GPT-2 tokenizer (10% validation)."""
    out = tmp_path_factory.mktemp("data") / "sonnets"
    prepare_dataset([SONNETS], out, val_fraction=0.1)
    return out
