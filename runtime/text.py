"""Between text and token ids, on the front end: prompts, chat templates, streaming detokenization,
and stop strings (the ranks only ever see ids)."""
from __future__ import annotations

import json
from pathlib import Path


class TextCodec:
    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.eos_ids = self._eos_ids(model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (
            self.eos_ids[0] if self.eos_ids else 0)

    def _eos_ids(self, model_dir: Path) -> list[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            value = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        return sorted(ids)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class Detokenizer:
    """Turns a growing list of ids into text deltas; holds back a trailing partial UTF-8 character."""

    def __init__(self, codec: TextCodec, skip: set[int] = frozenset()):
        self.codec = codec
        self.skip = skip          # end-of-sequence ids: never part of the text
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        if token in self.skip:
            return ""
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


class StopStrings:
    """Finds the first stop string in streamed text; holds back what could still become one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was hit)."""
        self.text += delta
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.sent = self.text[self.sent:cut], cut
            self.text = self.text[:cut]
            return out, True
        safe = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out, False
