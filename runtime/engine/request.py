"""What one generation asks for: the API front builds it, the supervisor sends it to the driver rank,
every rank decodes it as a Row (the same request with the id the supervisor gave it). No torch here:
the front process imports it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationRequest:
    input_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None   # None: not asked; N: the chosen token's logprob and the top N
    # OpenAI's adjustments of the logits before sampling: penalties on tokens already generated
    # (presence: once, frequency: per occurrence), and fixed biases as [token id, bias] pairs.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: list[tuple[int, float]] = field(default_factory=list)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass
class Row(GenerationRequest):
    """One sequence in the engine; the same on every rank."""
    id: str = field(kw_only=True)
