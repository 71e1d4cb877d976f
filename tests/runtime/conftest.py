"""Fixtures for the runtime: a tiny random Llama on disk and real `herd serve` processes."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from runtime.serving.processes import pid_alive

from tests.conftest import ROOT

CORPUS = ["The capital of France is Paris.", "Tensor parallel inference splits every layer.",
          "Hello world, hello herd.", "def main():\n    return 0\n", "안녕하세요 서울"] * 20
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A random-init Llama whose heads split over TP 2, fp32, with a real (small) BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         bos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeProcess:
    """A real `herd serve` in a child process, with its own state dir and port."""
    args: list[str]
    state_dir: Path
    port: int = field(default_factory=free_port)
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    tls: bool = False     # off loopback herd serves HTTPS with its deployment CA (state_dir/tls/ca.pem)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def verify(self):
        """What a client trusts: the deployment CA once herd has written it (plain HTTP: True)."""
        return str(self.state_dir / "tls" / "ca.pem") if self.tls else True

    def start(self) -> ServeProcess:
        self.log = open(self.state_dir / "serve.log", "ab")
        cmd = [sys.executable, "-m", "infra.cli", "serve", *self.args, "--port", str(self.port),
               "--state-dir", str(self.state_dir)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            assert self.proc.poll() is None, f"herd serve exited: {self.log_text()}"
            try:
                ready = (not self.tls or (self.state_dir / "tls" / "ca.pem").exists()) and httpx.get(
                    f"{self.url}/health/ready", timeout=2, verify=self.verify).status_code == 200
                if ready:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout}s: {self.log_text()}")

    def rank_pid(self, rank: int) -> int:
        return int((self.state_dir / "ranks" / f"{rank}.pid").read_text())

    def log_text(self) -> str:
        return (self.state_dir / "serve.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


alive = pid_alive  # the runtime's own liveness check: present and not a zombie


@pytest.fixture
def serve(tmp_path):
    """Start `herd serve` with the given arguments; stopped (and checked for leftovers) afterwards."""
    started: list[ServeProcess] = []

    def start(*args: str, env: dict | None = None, name: str = "node", tls: bool = False) -> ServeProcess:
        state = tmp_path / name
        state.mkdir()
        server = ServeProcess(list(args), state, env=env or {}, tls=tls).start()
        started.append(server)
        return server
    yield start
    for server in started:
        pids = []
        ranks = server.state_dir / "ranks"
        if ranks.is_dir():
            pids = [int(p.read_text()) for p in ranks.glob("*.pid")]
        server.stop()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)], "ranks outlived herd serve"


def stop_and_check(server: ServeProcess) -> None:
    """Stop a server, then fail if any of its ranks outlived it."""
    ranks = server.state_dir / "ranks"
    pids = [int(p.read_text()) for p in ranks.glob("*.pid")] if ranks.is_dir() else []
    server.stop()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "ranks outlived herd serve"


@pytest.fixture(scope="module")
def serve_module(tmp_path_factory):
    """Like `serve`, but a server lives for the whole test module: tests that leave it healthy share
    it, and each start (a model load per rank) is paid once."""
    started: list[ServeProcess] = []

    def start(*args: str, env: dict | None = None, name: str = "node") -> ServeProcess:
        state = tmp_path_factory.mktemp(name)
        server = ServeProcess(list(args), state, env=env or {}).start()
        started.append(server)
        return server
    yield start
    for server in started:
        stop_and_check(server)
