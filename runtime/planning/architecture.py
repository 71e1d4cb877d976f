"""A decoder-only transformer's shape, and the closed forms the planner needs from it.

Read from the catalog or from any model's Hugging Face `config.json`. Layout assumed: Llama-style
(RMSNorm, no biases unless the config says so, gated MLP with three projections, rotary positions).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class Architecture:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: dict, where: str = "config") -> Architecture:
        """From a config.json-like mapping; head_dim and num_key_value_heads default as HF does."""
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(config["intermediate_size"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
            )
        except KeyError as missing:
            raise UserError(f"{where}: field {missing.args[0]} is missing; a decoder config needs "
                            "vocab_size, hidden_size, num_hidden_layers, num_attention_heads, "
                            "intermediate_size") from None
        except (TypeError, ValueError) as bad:
            raise UserError(f"{where}: {bad}") from None

    @classmethod
    def from_config_json(cls, path: str | Path) -> Architecture:
        path = Path(path)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: no such file (expected a model's config.json)") from None
        except json.JSONDecodeError as bad:
            raise UserError(f"{path}: not valid JSON at line {bad.lineno}: {bad.msg}") from None
        # Multimodal configs nest the language model; accept the common key.
        config = config.get("text_config", config)
        return cls.from_config(config, where=str(path))

    # --- parameter counts (closed forms, checked against the meta-device model in tests) ---
    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        weights = h * self.q_width + 2 * h * self.kv_width + self.q_width * h
        biases = (self.q_width + 2 * self.kv_width) if self.attention_bias else 0
        return weights + biases

    @property
    def mlp_params_per_layer(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        return 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden_size

    @property
    def params_per_layer(self) -> int:
        return self.attention_params_per_layer + self.mlp_params_per_layer + self.norm_params_per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        return (self.num_hidden_layers * self.params_per_layer + self.embedding_params
                + self.lm_head_params + self.hidden_size)  # + final norm

    def kv_bytes_per_token(self, kv_dtype_bytes: int = 2) -> int:
        """K and V for one token across the whole model."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * kv_dtype_bytes

    def valid_tensor_parallel(self, tp: int) -> bool:
        """TP must split the query heads evenly; KV heads either split evenly or are replicated."""
        kv = self.num_key_value_heads
        return (tp >= 1 and self.num_attention_heads % tp == 0
                and (kv % tp == 0 or tp % kv == 0))

    def tensor_parallel_choices(self, limit: int) -> list[int]:
        return [tp for tp in range(1, limit + 1) if self.valid_tensor_parallel(tp)]
