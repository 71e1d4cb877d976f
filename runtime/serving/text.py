"""Between text and token ids, on the front end: prompts, chat templates, streaming detokenization,
and stop strings (the ranks only ever see ids)."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path


class TextCodec:
    def __init__(self, model_dir: Path):
        from transformers.models.auto import AutoTokenizer
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
    """Turns streamed ids into text deltas with constant work per token (never re-decoding the whole
    output: at 16k tokens that was quadratic, on the server's event loop). Holds back a trailing partial
    UTF-8 character until the token that completes it; `flush()` gives whatever is still held."""

    def __init__(self, codec: TextCodec, skip: Iterable[int] = frozenset()):
        self.codec = codec
        self.skip = frozenset(skip)   # end-of-sequence ids: never part of the text
        backend = _rust_tokenizer(codec.tokenizer)
        # The Rust decoder alone equals codec.decode for BPE tokenizers (Llama-class): transformers applies
        # clean_up_tokenization_spaces only to others (WordPiece), which generative models do not use.
        self._decoder = _StreamDecoder(backend) if backend is not None else _WindowDecoder(codec.decode)

    def add(self, token: int) -> str:
        if token in self.skip:
            return ""
        return self._decoder.add(token)

    def flush(self) -> str:
        """Once, after the last token: the text still held back (a cut-off character decodes as U+FFFD)."""
        return self._decoder.flush()


def _rust_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` behind a fast (Rust) tokenizer, or None for a pure-Python one."""
    from tokenizers import Tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


class _WindowDecoder:
    """Incremental decoding over a short window of ids, for tokenizers without a Rust backend (the
    scheme of vLLM's detokenize_incrementally and of DecodeStream itself). The window holds the ids of
    the last emitted chunk as context, then the ids not yet emitted: decoders that depend on context
    (SentencePiece's leading space, byte fallback) see enough of it, and the work per token stays
    bounded by the length of one chunk."""

    def __init__(self, decode: Callable[[list[int]], str], ids: list[int] | None = None, read: int = 0):
        self.decode = decode
        self.ids = ids or []       # ids[:read] were emitted already (the context), ids[read:] were not
        self.read = read
        self.prefix = decode(self.ids[:read]) if read else ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if len(text) <= len(self.prefix) or text.endswith("\ufffd"):
            return ""              # nothing new yet, or a character still missing its last bytes
        return self._emit(text)

    def flush(self) -> str:
        if len(self.ids) == self.read:
            return ""
        return self._emit(self.decode(self.ids))

    def _emit(self, text: str) -> str:
        delta = text[len(self.prefix):]
        self.ids = self.ids[self.read:]
        self.read = len(self.ids)
        self.prefix = self.decode(self.ids)
        return delta


class _StreamDecoder:
    """`tokenizers.decoders.DecodeStream` (its window logic in Rust), plus the few ids that `flush()` and
    a fallback need: the last emitted chunk's ids (context) and the ids held since."""

    def __init__(self, backend):
        from tokenizers.decoders import DecodeStream
        self.backend = backend
        self.stream = DecodeStream(skip_special_tokens=True)
        self.context: list[int] = []
        self.pending: list[int] = []
        self.fallback: _WindowDecoder | None = None

    def add(self, token: int) -> str:
        if self.fallback is not None:
            return self.fallback.add(token)
        try:
            delta = self.stream.step(self.backend, token)
        except Exception:  # noqa: BLE001 - DecodeStream refuses a window whose text changed its prefix
            self.fallback = self._window()
            return self.fallback.add(token)
        if delta is None:
            self.pending.append(token)
            return ""
        self.context, self.pending = self.pending + [token], []
        return delta

    def flush(self) -> str:
        return (self.fallback or self._window()).flush()

    def _window(self) -> _WindowDecoder:
        return _WindowDecoder(self._decode, self.context + self.pending, len(self.context))

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)


class StopStrings:
    """Finds the first stop string in streamed text; holds back only what could still become one.

    Keeps no more than the held-back text: each delta is searched together with that tail (at most the
    longest stop's length minus one), so the work per delta does not grow with the output."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.held = ""
        self.hit = False

    def feed(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was hit). Nothing is sent after a hit."""
        if self.hit:
            return "", True
        text = self.held + delta
        cut = self._first_stop(text)
        if cut is not None:
            self.hit, self.held = True, ""
            return text[:cut], True
        keep = 0 if final else self._partial_stop(text)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts (the first one wins), or None."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string (it may still complete)."""
        return max((_overlap(text, s) for s in self.stops), default=0)


def _overlap(text: str, stop: str) -> int:
    """The largest k < len(stop) with text ending in stop[:k]; only ks whose last character matches
    text's last one are tried, so a long stop string costs little."""
    if not text:
        return 0
    k = min(len(stop) - 1, len(text))
    while k > 0:
        k = stop.rfind(text[-1], 0, k) + 1
        if k and text.endswith(stop[:k]):
            return k
        k -= 1
    return 0
