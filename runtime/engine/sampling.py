"""Choosing the next token per row: greedy at temperature 0, else temperature + nucleus (top_p)."""
from __future__ import annotations

import torch


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed())
    return gen


def choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One row's next token from its last-position logits (1-D, full vocabulary)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
