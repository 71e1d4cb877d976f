"""Engines: what turns token ids into more token ids. The supervisor talks to one through a Backend
(runtime.backend); "transformers" is the built-in tensor-parallel engine, "vllm" plugs in beside it."""
