"""Choosing the next token for every row of a batch, on the logits' device.

Greedy rows take the argmax. Sampled rows draw from temperature-scaled probabilities, cut to the
nucleus (top_p), with the exponential race: argmax(p / E) with E ~ Exp(1) per token picks token i with
probability p_i / sum(p) (the Gumbel-max trick in another form). Each row draws its noise from its own
generator on the device, so a seed reproduces that row's tokens whatever else shares the batch, and
nothing waits for the host until the driver reads the chosen ids (one transfer per step).
"""
from __future__ import annotations

import torch

# Below this temperature sampling is greedy: dividing logits by ~1e-39 overflows to inf and softmax
# to NaN (vLLM uses the same floor).
MIN_TEMPERATURE = 1e-5
SEED_MASK = 2**64 - 1   # torch generators take 64-bit seeds; larger seeds are reduced, never refused here


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()          # non-deterministic, and leaves the global generator alone
    else:
        gen.manual_seed(seed & SEED_MASK)
    return gen


def is_greedy(temperature: float) -> bool:
    return not temperature >= MIN_TEMPERATURE   # NaN counts as greedy too


def sample(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row of `logits` (rows x vocab), as a tensor on the logits' device."""
    chosen = torch.argmax(logits, dim=-1)
    sampled = [i for i, t in enumerate(temperatures) if not is_greedy(t)]
    if not sampled:
        return chosen
    device = logits.device
    index = torch.tensor(sampled, device=device)
    temps = torch.tensor([temperatures[i] for i in sampled], device=device, dtype=torch.float32)
    probs = torch.softmax(logits.index_select(0, index).float() / temps[:, None], dim=-1)
    tops = [min(max(top_ps[i], 0.0), 1.0) for i in sampled]
    if any(p < 1.0 for p in tops):
        top = torch.tensor(tops, device=device, dtype=torch.float32)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top[:, None]
        keep[:, 0] = True
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    noise = torch.stack([torch.empty(probs.shape[-1], device=device).exponential_(generator=generators[i])
                         for i in sampled])
    chosen[index] = torch.argmax(probs / noise, dim=-1)
    return chosen


def choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One row's next token from its last-position logits (1-D): `sample` for a batch of one."""
    return int(sample(logits[None], [temperature], [top_p], [generator])[0])


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the model's own distribution (before temperature), as distillation wants it: per row the
    chosen token's logprob and the `top` best (values, ids), all on the logits' device."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, tokens[:, None])[:, 0]
    best = torch.topk(logp, top, dim=-1) if top > 0 else None
    empty = logp[:, :0]
    if best is None:
        return picked, empty, empty.long()
    return picked, best.values, best.indices
