"""The catalog: models, accelerators and instance types, read from the YAML files beside this module."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from runtime.planning.architecture import Architecture
from runtime.errors import unknown_name

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Fp8Checkpoint:
    """Which modules a published FP8 checkpoint really stores in FP8."""
    source: str
    quantized_modules: tuple[str, ...]   # subset of ("attention", "mlp")
    skip_first_last: bool                # first and last transformer blocks left in BF16


@dataclass(frozen=True)
class ToolCalling:
    """How vLLM serves the model's tool calls: its parser, and the chat template herd ships for the model
    when the model's own renders no tools (a file name under runtime/engine/chat_templates/, no suffix)."""
    parser: str
    chat_template: str | None = None


@dataclass(frozen=True)
class Model:
    id: str
    source: str
    architecture: Architecture
    fp8_checkpoint: Fp8Checkpoint | None = None
    tool_calling: ToolCalling | None = None


@dataclass(frozen=True)
class Accelerator:
    id: str
    name: str
    memory_bytes: int | None     # None for "cpu": the host's RAM decides
    hbm_bytes_per_s: float
    bf16_tflops: float
    fp8_tflops: float | None
    fp8: bool
    source: str
    kind: str = "gpu"            # gpu | tpu | cpu
    int8_tops: float | None = None

    @property
    def is_gpu(self) -> bool:
        """A device with memory of its own (a GPU or a TPU chip), as the planner counts it; not a CPU."""
        return self.kind != "cpu"

    @property
    def is_tpu(self) -> bool:
        return self.kind == "tpu"

    @property
    def unit(self) -> str:
        """What one device is called in plans and refusals."""
        return {"gpu": "GPU", "tpu": "TPU chip", "cpu": "CPU rank"}[self.kind]


@dataclass(frozen=True)
class Instance:
    id: str
    cloud: str
    accelerator: str
    gpus: int
    vcpus: int
    host_ram_bytes: int
    local_nvme_bytes: int
    network_gbps: float
    efa_interfaces: int
    fabric: str
    price_usd_per_hour: float
    price_date: str
    note: str = ""
    # TPU slices: the slice's host VMs (`gpus` is the chips of each), the name the Cloud TPU API takes,
    # the TPU VM software version, the spot price; None/1 for GPU instance types.
    hosts: int = 1
    accelerator_type: str | None = None
    runtime_version: str | None = None
    spot_price_usd_per_hour: float | None = None
    price_region: str | None = None


def _load(name: str) -> dict:
    with open(HERE / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


@cache
def models() -> dict[str, Model]:
    out = {}
    for model_id, row in _load("models.yaml").items():
        fp8 = row.get("fp8_checkpoint")
        tools = row.get("tool_calling")
        out[model_id] = Model(
            id=model_id,
            source=row["source"],
            architecture=Architecture.from_config(row),
            fp8_checkpoint=Fp8Checkpoint(fp8["source"], tuple(fp8["quantized_modules"]),
                                         bool(fp8["skip_first_last"])) if fp8 else None,
            tool_calling=ToolCalling(tools["parser"], tools.get("chat_template")) if tools else None,
        )
    return out


@cache
def accelerators() -> dict[str, Accelerator]:
    return {
        acc_id: Accelerator(
            id=acc_id, name=row["name"],
            memory_bytes=row["memory_mib"] * 2**20 if row["memory_mib"] else None,
            hbm_bytes_per_s=row["hbm_tbps"] * 1e12, bf16_tflops=row["bf16_tflops"],
            fp8_tflops=row["fp8_tflops"], fp8=row["fp8"], source=row["source"],
            kind=row.get("kind", "cpu" if acc_id == "cpu" else "gpu"), int8_tops=row.get("int8_tops"))
        for acc_id, row in _load("accelerators.yaml").items()
    }


@cache
def instances() -> dict[str, Instance]:
    return {
        inst_id: Instance(
            id=inst_id, cloud=row["cloud"], accelerator=row["accelerator"], gpus=row["gpus"],
            vcpus=row["vcpus"], host_ram_bytes=row["host_ram_gib"] * 2**30,
            local_nvme_bytes=int(row["local_nvme_gb"] * 1e9), network_gbps=row["network_gbps"],
            efa_interfaces=row["efa_interfaces"], fabric=row["fabric"],
            price_usd_per_hour=row["price_usd_per_hour"], price_date=str(row["price_date"]),
            note=row.get("note", ""), hosts=row.get("hosts", 1), accelerator_type=row.get("accelerator_type"),
            runtime_version=row.get("runtime_version"), spot_price_usd_per_hour=row.get("spot_price_usd_per_hour"),
            price_region=row.get("price_region"))
        for inst_id, row in [*_load("instances.yaml").items(), *_load("tpu_slices.yaml").items()]
    }


def model(model_id: str, field: str = "model.id") -> Model:
    if model_id not in models():
        raise unknown_name(field, model_id, models())
    return models()[model_id]


def accelerator(acc_id: str, field: str = "accelerator") -> Accelerator:
    if acc_id not in accelerators():
        raise unknown_name(field, acc_id, accelerators())
    return accelerators()[acc_id]


def instance(inst_id: str, field: str = "instance") -> Instance:
    if inst_id not in instances():
        raise unknown_name(field, inst_id, instances())
    return instances()[inst_id]
