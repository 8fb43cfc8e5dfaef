"""Choosing the next token from full logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How tokens are chosen and when generation stops."""

    max_new_tokens: int = 64
    """Tokens to generate per prompt at most."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0 is greedy (always the most likely token)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0: all."""
    top_p: float = 1.0
    """Sample among the fewest most likely tokens whose probabilities sum to at least p, in (0, 1]."""
    seed: int = 0
    """Seed of the sampling generator: the same seed gives the same text (on every rank alike)."""

    def check(self) -> None:
        """ValueError naming the value a user gave outside its range."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (b,) from fp32 logits (b, V)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / params.temperature
    if params.top_k > 0:
        kth = scores.topk(min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]  # (b, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the more likely ones before it already reach p; the first always stays.
        drop = (cumulative - ordered.softmax(dim=-1)) >= params.top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
