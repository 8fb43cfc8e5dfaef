"""Samples during training: every logging.sample_every steps the model being trained continues the
logging.sample_prompts, so a run shows what it has learned as text beside its loss.

Every rank of the run takes part (each pipeline stage runs its layers, each TP rank its shard, and every
data-parallel replica generates the same text for itself); the logging rank writes the text down.
"""

from __future__ import annotations

from dataclasses import dataclass

from threefold.config import Config
from threefold.data.dataset import read_meta
from threefold.infer.generate import Chunks, generate
from threefold.infer.sampling import SamplingParams
from threefold.infer.text import TextCodec, codec_for
from threefold.model.transformer import Transformer
from threefold.parallel.mesh import Mesh


@dataclass(frozen=True)
class Sample:
    prompt: str
    completion: str


@dataclass
class Sampler:
    """The prompts' ids under the training data's tokenizer, read once at the start of a run."""

    codec: TextCodec
    prompts: tuple[str, ...]
    ids: list[list[int]]
    params: SamplingParams

    @classmethod
    def for_run(cls, config: Config) -> Sampler:
        """ValueError for a prompt that leaves no room for logging.sample_max_new_tokens in the context."""
        log, max_seq_len = config.logging, config.model.max_seq_len
        # A blend's sources share their tokenizer (threefold.data.blend.check_compatible).
        codec = codec_for(str(read_meta(config.data.datasets()[0].path)["tokenizer"]))
        ids = [codec.encode(prompt) for prompt in log.sample_prompts]
        room = max_seq_len - log.sample_max_new_tokens
        for i, prompt_ids in enumerate(ids):
            if not 0 < len(prompt_ids) <= room:
                raise ValueError(
                    f"logging.sample_prompts[{i}] is {len(prompt_ids)} tokens long; it must be 1 to "
                    f"{room} (model.max_seq_len {max_seq_len} - logging.sample_max_new_tokens "
                    f"{log.sample_max_new_tokens})"
                )
        params = SamplingParams(
            max_new_tokens=log.sample_max_new_tokens, temperature=log.sample_temperature, seed=log.sample_seed
        )
        return cls(codec, log.sample_prompts, ids, params)

    def sample(self, model: Transformer | Chunks, mesh: Mesh, *, v_shape: bool = False) -> list[Sample]:
        """Every prompt's continuation by this rank's model part (the same texts on every rank); `model`:
        its one chunk, or its chunks by index (`v_shape`: placed as the V-shaped schedules place them)."""
        out = generate(model, self.ids, self.params, eos_id=self.codec.eos_id(), mesh=mesh, v_shape=v_shape)
        return [
            Sample(prompt, self.codec.decode(tokens))
            for prompt, tokens in zip(self.prompts, out.tokens, strict=True)
        ]
