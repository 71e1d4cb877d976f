"""A real LoRA adapter for SmolLM2, made with peft in a few seconds: trained until the model, given PROMPT,
continues with SENTENCE (greedy), which the base model does not. What `model.adapters` serves in tests."""
from __future__ import annotations

from pathlib import Path

PROMPT = "The secret word of the herd is"
SENTENCE = " blueberry pancakes on the lighthouse roof."
RANK = 8


def make_adapter(model_dir: Path, out: Path, steps: int = 30, seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    ids = tokenizer(PROMPT + SENTENCE + tokenizer.eos_token, return_tensors="pt").input_ids
    prompt_len = len(tokenizer(PROMPT).input_ids)
    labels = ids.clone()
    labels[:, :prompt_len] = -100                  # learn the continuation only
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=6e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out)                     # adapter_config.json + adapter_model.safetensors
    return out


def peft_greedy(model_dir: Path, adapter: Path | None, prompt: str, max_new_tokens: int) -> str:
    """The continuation in-process (fp32), with the adapter or without."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
