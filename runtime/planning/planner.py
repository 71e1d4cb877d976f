"""The capacity planner: pure arithmetic, no I/O.

Given an architecture, a precision, a context and a hardware shape, it decides tensor and pipeline
parallelism (when `auto`), checks per-device memory, host RAM and disk, and reports the KV room left,
the decode floor from memory bandwidth, cost, and a cold-start estimate. When nothing fits it says every
reason with numbers and which catalog configurations would fit, cheapest first.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from runtime.planning import catalog
from runtime.planning.architecture import DTYPE_BYTES, Architecture
from runtime.planning.catalog import Accelerator, Fp8Checkpoint

GB = 1e9
GIB = 2**30


# ---------------------------------------------------------------- overhead model
@dataclass(frozen=True)
class OverheadModel:
    """What a device holds besides weights and KV cache, calibrated against a GPU run.

    Calibration (bench/results/gpu-decode-H200.txt: one H200, torch 2.11 + CUDA 13.0, transformers
    5.24, random Llama-3.1-8B shape in bf16, batch 1/8/32 x 512-token prompts): the planner's allocation
    part (weights + KV + activations + logits) came within 0.3% of torch's peak allocated bytes, and
    the device total below within 1.6% of peak reserved bytes plus the CUDA context.
    - CUDA context: 552 MB on that stack (an earlier H100 with an older CUDA showed 99 MB; the larger
      figure is kept so the plan errs on the safe side).
    - Prefill activations: (4*hidden + 3*intermediate/tp) * dtype bytes per prompt token: the residual
      stream copies plus the gated MLP's three intermediate tensors; under TP only the MLP part splits.
    - Caching-allocator reserve (reserved but not allocated at the peak): 155 MB plus 0.71 byte per
      byte of prefill activations (blocks freed by the prefill stay cached, split and partly reused).
    """
    gpu_context_bytes: int = 552_000_000
    allocator_reserve_bytes: int = 155_000_000
    allocator_reserve_per_activation_byte: float = 0.71
    # NCCL's per-peer channel buffers; an estimate until a multi-GPU run calibrates it.
    collective_buffers_bytes: int = 512 * 2**20
    # A CPU rank: the Python interpreter, torch and the tokenizer, measured ~350 MB RSS here.
    cpu_process_bytes: int = 400_000_000
    # A TPU chip: XLA's runtime and compiled programs. An estimate, not calibrated by any TPU run (plans
    # on TPUs say so).
    tpu_runtime_bytes: int = 2 * 2**30

    def activation_bytes_per_prefill_token(self, arch: Architecture, tp: int, act_bytes: int) -> float:
        return (4 * arch.hidden_size + 3 * arch.intermediate_size / tp) * act_bytes

    def breakdown(self, arch: Architecture, tp: int, world: int, act_bytes: int, prefill_tokens: int,
                  batch: int, on_gpu: bool, on_tpu: bool = False) -> dict[str, int]:
        parts = {
            "activations": int(prefill_tokens * self.activation_bytes_per_prefill_token(arch, tp, act_bytes)),
            # Generation keeps one position's logits per sequence, upcast to fp32, full vocab on every rank.
            "logits": batch * arch.vocab_size * 4,
        }
        if on_tpu:
            parts["xla_runtime"] = self.tpu_runtime_bytes
        elif on_gpu:
            parts["cuda_context"] = self.gpu_context_bytes
            parts["allocator_reserve"] = int(self.allocator_reserve_bytes
                                             + self.allocator_reserve_per_activation_byte * parts["activations"])
            parts["collective_buffers"] = self.collective_buffers_bytes if world > 1 else 0
        else:
            parts["process"] = self.cpu_process_bytes
        return parts


OVERHEAD = OverheadModel()
# Assumptions for the cold-start estimate: one host pulls from object storage at up to this rate
# (S3/GCS per-host throughput in practice), then reads the weights from local disk into device memory.
FETCH_GBPS_CAP = 100.0
LOAD_BYTES_PER_S = 5 * GB
DEFAULT_MAX_NODES = 4


# ---------------------------------------------------------------- inputs and outputs
@dataclass(frozen=True)
class Hardware:
    """One node's shape. For clouds it comes from an instance type; on-prem and local describe it."""
    accelerator: Accelerator
    devices_per_node: int
    host_ram_bytes: int | None = None
    disk_bytes: int | None = None
    instance: str | None = None
    price_usd_per_hour: float | None = None   # per node
    price_date: str | None = None
    network_gbps: float | None = None
    max_nodes: int = DEFAULT_MAX_NODES         # per group (replica)
    hosts: int | None = None                   # on-prem: every host listed, shared by all replicas
    slice_hosts: int | None = None             # a TPU slice: exactly these hosts serve one group
    cpu_cores: int | None = None               # CPU targets where known (local: this host's, per replica)

    @classmethod
    def from_instance(cls, instance_id: str, field: str = "instance", max_nodes: int = DEFAULT_MAX_NODES):
        inst = catalog.instance(instance_id, field)
        acc = catalog.accelerator(inst.accelerator)
        return cls(accelerator=acc, devices_per_node=inst.gpus,
                   host_ram_bytes=inst.host_ram_bytes, disk_bytes=inst.local_nvme_bytes or None,
                   instance=inst.id, price_usd_per_hour=inst.price_usd_per_hour,
                   price_date=inst.price_date, network_gbps=inst.network_gbps,
                   max_nodes=inst.hosts if acc.is_tpu else max_nodes,
                   slice_hosts=inst.hosts if acc.is_tpu else None)

    def device_memory_bytes(self, ranks_on_node: int) -> int:
        """One device's memory: an accelerator's own, or a CPU rank's share of the host's RAM among
        the ranks this node runs."""
        if self.accelerator.memory_bytes is not None:
            return self.accelerator.memory_bytes
        return (self.host_ram_bytes or 0) // max(1, ranks_on_node)


@dataclass(frozen=True)
class PlanRequest:
    architecture: Architecture
    hardware: Hardware
    model_id: str = "custom"
    dtype: str = "bfloat16"
    quantization: str = "none"
    kv_cache_dtype: str = "auto"
    max_model_len: int = 8192
    concurrency: int = 8
    max_prefill_tokens: int = 8192
    tensor: int | Literal["auto"] = "auto"
    pipeline: int | Literal["auto"] = "auto"
    nodes: int | Literal["auto"] = "auto"
    memory_utilization: float = 0.90
    engine: str = "transformers"
    fp8_checkpoint: Fp8Checkpoint | None = None
    overhead: OverheadModel = OVERHEAD
    replicas: int = 1                          # independent groups of this shape
    lora_slots: int = 0                        # LoRA adapters vLLM holds at once (--max-loras)
    lora_rank: int = 0                         # their reserved rank (--max-lora-rank)
    guard_bytes: int = 0                       # a guard model served beside it (serving.guard.model)


@dataclass
class PerDeviceBytes:
    weights: int
    kv_cache: int
    overhead: int
    total: int
    capacity: int


@dataclass
class Suggestion:
    instance: str
    nodes: int
    quantization: str
    tensor_parallel: int
    pipeline_parallel: int
    cost_usd_per_hour: float
    price_date: str


@dataclass
class Plan:
    fits: bool
    model: str
    engine: str
    accelerator: str
    instance: str | None
    quantization: str
    dtype: str
    nodes: int
    gpus_per_node: int
    tensor_parallel: int
    pipeline_parallel: int
    per_gpu_bytes: PerDeviceBytes
    overhead_breakdown: dict[str, int]
    parameters: int
    weights_total_bytes: int
    max_kv_tokens: int
    kv_bytes_per_token_per_gpu: int
    decode_ms_per_token_floor: float
    tokens_per_s_ceiling: float
    cost_usd_per_hour: float | None
    cost_usd_per_million_tokens: float | None
    price_date: str | None
    cold_start_s: float
    # Everything above is one group (replica); these count all of them.
    replicas: int = 1
    total_nodes: int = 0
    total_devices: int = 0
    total_cost_usd_per_hour: float | None = None
    total_tokens_per_s_ceiling: float = 0.0
    device_memory_bytes: int = 0     # one device's memory, whole (capacity is its usable fraction)
    slice_hosts: int | None = None   # a TPU slice: the hosts of the one slice a group runs on
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- weights per device
def _linear_bytes_per_param(quantization: str, dtype_bytes: int) -> float:
    return {"none": dtype_bytes, "fp8": 1.0, "int8": 1.0,
            # int4: packed nibbles + one fp16 scale per group of 128 weights.
            "int4": 0.5 + 2 / 128}[quantization]


def _layer_bytes(arch: Architecture, layer: int, tp: int, req: PlanRequest) -> float:
    """Bytes of one transformer block held by one tensor-parallel rank."""
    dtype_bytes = DTYPE_BYTES[req.dtype]
    h, hd = arch.hidden_size, arch.head_dim
    kv_heads_per_rank = max(1, arch.num_key_value_heads // tp)  # above kv_heads, KV heads replicate
    q_o = 2 * h * arch.q_width / tp
    k_v = 2 * h * kv_heads_per_rank * hd
    mlp = arch.mlp_params_per_layer / tp
    norms = arch.norm_params_per_layer  # replicated on every rank

    quantized = {"attention": req.quantization != "none", "mlp": req.quantization != "none"}
    ckpt = req.fp8_checkpoint if req.quantization == "fp8" else None
    if ckpt is not None:
        first_last = layer in (0, arch.num_hidden_layers - 1)
        for module in quantized:
            quantized[module] = module in ckpt.quantized_modules and not (ckpt.skip_first_last and first_last)
    q_bytes = _linear_bytes_per_param(req.quantization, dtype_bytes)
    # Row-wise scales: one fp32 per output row of each quantized matrix (FP8/INT8 checkpoints).
    scale = 4 if req.quantization in ("fp8", "int8") else 0
    attn = (q_o + k_v) * (q_bytes if quantized["attention"] else dtype_bytes)
    if quantized["attention"] and scale:
        attn += scale * (arch.q_width / tp + 2 * kv_heads_per_rank * hd + h)
    mlp_b = mlp * (q_bytes if quantized["mlp"] else dtype_bytes)
    if quantized["mlp"] and scale:
        mlp_b += scale * (2 * arch.intermediate_size / tp + h)
    return attn + mlp_b + norms * dtype_bytes


def _stage_layers(layers: int, pp: int) -> list[range]:
    base, extra = divmod(layers, pp)
    stages, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        stages.append(range(start, start + n))
        start += n
    return stages


def weights_per_device(arch: Architecture, req: PlanRequest, tp: int, pp: int) -> tuple[int, int]:
    """(bytes on the heaviest device, layers on that device's stage)."""
    dtype_bytes = DTYPE_BYTES[req.dtype]
    # Embeddings and lm_head split by vocabulary rows; with a vocabulary TP does not divide, the
    # heaviest rank holds the rounded-up share.
    vocab_split = math.ceil(arch.vocab_size / tp) * arch.hidden_size * dtype_bytes
    worst, worst_layers = 0.0, 0
    for s, layers in enumerate(_stage_layers(arch.num_hidden_layers, pp)):
        b = sum(_layer_bytes(arch, i, tp, req) for i in layers)
        if s == 0:
            b += vocab_split
        if s == pp - 1:
            b += arch.hidden_size * dtype_bytes  # final norm
            if not arch.tie_word_embeddings or pp > 1:  # a tied head on another stage is a copy
                b += vocab_split
        if b > worst:
            worst, worst_layers = b, len(layers)
    return int(worst), worst_layers


def weights_total(arch: Architecture, req: PlanRequest) -> int:
    return weights_per_device(arch, req, tp=1, pp=1)[0]


# ---------------------------------------------------------------- the plan
def _kv_dtype_bytes(req: PlanRequest) -> int:
    if req.kv_cache_dtype == "auto":
        return DTYPE_BYTES[req.dtype]
    return DTYPE_BYTES[req.kv_cache_dtype]


def auto_tensor(arch: Architecture, hw: Hardware) -> int:
    """`tensor: auto`: the largest degree that divides the model's heads within one node's devices. A
    CPU node's devices are its cores, so every rank has a core of its own; and on CPUs no more ranks
    than KV heads (replicated KV heads add all-reduce and copies for no less work per rank)."""
    limit = hw.devices_per_node
    if not hw.accelerator.is_gpu:
        limit = min(limit, arch.num_key_value_heads)
    choices = arch.tensor_parallel_choices(limit)
    return choices[-1] if choices else 1


def _auto_note(arch: Architecture, hw: Hardware, tp: int) -> str:
    valid = arch.tensor_parallel_choices(max(64, tp))
    choices = ", ".join(map(str, valid[:6])) + (", ..." if len(valid) > 6 else "")
    room = (f"{hw.devices_per_node} chips per TPU host" if hw.accelerator.is_tpu
            else f"{hw.devices_per_node} GPUs per node" if hw.accelerator.is_gpu
            else f"a core per rank on {hw.devices_per_node} cores, no more ranks than KV heads")
    return (f"tensor auto = {tp}: the largest degree dividing the model's {arch.num_attention_heads} attention "
            f"and {arch.num_key_value_heads} KV heads ({choices}) with {room}")


# A tensor-parallel CPU group with more ranks than cores, measured (bench/results/serving-shipped-cpu-2core.txt,
# SmolLM2, the embedded default and the same file at tensor 3 on a 2-core host, best of 5 rounds).
OVERSUBSCRIBED_MEASURED = ("measured on a 2-core host: one chat decoded at 4.1 tokens/s at TP 3 against 22.0 at "
                           "TP 1, each at its dtype auto")


def _evaluate(req: PlanRequest, tp: int, pp: int) -> Plan:
    arch, hw = req.architecture, req.hardware
    on_gpu = hw.accelerator.is_gpu
    world = tp * pp
    per_node = min(world, hw.devices_per_node) if pp == 1 else tp
    nodes = pp if pp > 1 else math.ceil(world / hw.devices_per_node)
    reasons: list[str] = []
    notes: list[str] = []

    weights, stage_layers = weights_per_device(arch, req, tp, pp)
    kv_per_token = 2 * stage_layers * max(1, arch.num_key_value_heads // tp) * arch.head_dim * _kv_dtype_bytes(req)
    kv_needed = kv_per_token * req.max_model_len * req.concurrency
    prefill = min(req.max_model_len * req.concurrency, req.max_prefill_tokens)
    act_bytes = DTYPE_BYTES[req.dtype]
    overhead_parts = req.overhead.breakdown(arch, tp, world, act_bytes, prefill, req.concurrency, on_gpu,
                                            hw.accelerator.is_tpu)
    if req.lora_slots:
        overhead_parts["lora_adapters"] = lora_bytes(arch, stage_layers, req.lora_slots, req.lora_rank, act_bytes, tp)
    if req.guard_bytes:
        # The guard's vLLM runs on the head's first device; every device is planned as that one.
        overhead_parts["guard_model"] = req.guard_bytes
    overhead = sum(overhead_parts.values())
    device_memory = hw.device_memory_bytes(per_node)
    capacity = int(device_memory * req.memory_utilization)
    total = weights + kv_needed + overhead
    free_for_kv = capacity - weights - overhead
    max_kv_tokens = max(0, free_for_kv // kv_per_token) if kv_per_token else 0

    unit = hw.accelerator.unit
    if not arch.valid_tensor_parallel(tp):
        reasons.append(f"tensor parallel {tp} does not divide {arch.num_attention_heads} attention / "
                       f"{arch.num_key_value_heads} KV heads")
    if tp > hw.devices_per_node and on_gpu:
        reasons.append(f"tensor parallel {tp} exceeds the {hw.devices_per_node} devices of one node")
    elif tp > hw.devices_per_node:
        notes.append(f"tensor parallel {tp} spans {nodes} CPU hosts over TCP (gloo): correct, not fast")
    if not on_gpu and hw.cpu_cores and per_node > hw.cpu_cores:
        notes.append(f"tensor parallel {tp} puts {per_node} ranks on {hw.cpu_cores} cores: they take turns on "
                     f"the cores and every layer's all-reduce waits for the one descheduled "
                     f"({OVERSUBSCRIBED_MEASURED}); tensor: auto gives each rank a core")
    if pp > arch.num_hidden_layers:
        reasons.append(f"pipeline parallel {pp} exceeds the model's {arch.num_hidden_layers} layers")
    if hw.slice_hosts is not None and nodes != hw.slice_hosts:
        reasons.append(f"a {hw.instance} slice is {hw.slice_hosts} host(s) of {hw.devices_per_node} chips: one "
                       f"group runs a pipeline stage per host ({hw.slice_hosts}), not {nodes}")
    if hw.accelerator.is_tpu:
        notes.append(f"TPU: XLA's runtime counted as {req.overhead.tpu_runtime_bytes / GIB:.0f} GiB per chip, an "
                     "estimate no TPU run has calibrated")
        if arch.num_hidden_layers > 80:   # larger than Llama 3.x 70B
            notes.append("TPU: vLLM's TPU backend lists Llama 3.1 8B and 3.3 70B as supported; a model this size "
                         "on it is untested (Google's own 405B recipe serves int8 on a v6e-16 with JetStream and "
                         "MaxText)")
    if req.replicas > 1 and hw.hosts is not None and nodes * req.replicas > hw.hosts:
        reasons.append(f"needs {nodes} nodes per replica x {req.replicas} replicas = {nodes * req.replicas}, "
                       f"{hw.hosts} hosts available")
    elif nodes > hw.max_nodes:
        reasons.append(f"needs {nodes} nodes, at most {hw.max_nodes} available")
    if total > capacity:
        reasons.append(
            f"per-{unit} memory: weights {weights / GIB:.1f} GiB + KV cache {kv_needed / GIB:.1f} GiB "
            f"({req.concurrency} x {req.max_model_len} tokens) + overhead {overhead / GIB:.1f} GiB = "
            f"{total / GIB:.1f} GiB > {capacity / GIB:.1f} GiB ({device_memory / GIB:.1f} GiB x "
            f"{req.memory_utilization:.2f})")
    node_weights = weights * per_node
    if hw.host_ram_bytes and on_gpu and node_weights > hw.host_ram_bytes * 0.9:
        reasons.append(f"host RAM: a node loads {node_weights / GIB:.0f} GiB of weights, more than 90% of "
                       f"its {hw.host_ram_bytes / GIB:.0f} GiB RAM")
    full = weights_total(arch, req)
    if hw.disk_bytes and full > hw.disk_bytes * 0.95:
        tpu = (" free on its 100 GiB TPU VM boot disk: give gcp.weights_disk (a disk holding the weights, "
               "attached read-only to every host)") if hw.accelerator.is_tpu else ""
        reasons.append(f"local disk: the checkpoint is {full / GB:.0f} GB, the node has "
                       f"{hw.disk_bytes / GB:.0f} GB{tpu}")
    if req.quantization == "fp8" and hw.accelerator.is_tpu:
        reasons.append(f"{hw.accelerator.id} has no FP8: quantize to int8 (herd serves TPUs with vLLM's TPU "
                       "backend, whose quantized checkpoints are int8)")
    elif req.quantization == "fp8" and on_gpu and not hw.accelerator.fp8:
        notes.append(f"{hw.accelerator.id} has no FP8 tensor cores: FP8 runs weight-only "
                     "(weights stored in FP8, upcast to BF16 for the matmuls; e.g. vLLM's Marlin kernels)")
    if req.quantization == "fp8" and req.fp8_checkpoint:
        notes.append(f"FP8 modelled as the published checkpoint {req.fp8_checkpoint.source}: "
                     f"{'+'.join(req.fp8_checkpoint.quantized_modules)} in FP8"
                     + (", first and last blocks in BF16" if req.fp8_checkpoint.skip_first_last else ""))
    if tp > arch.num_key_value_heads:
        notes.append(f"tensor parallel {tp} > {arch.num_key_value_heads} KV heads: KV heads are replicated")

    # Decode floor: every step reads each device's weights and the batch's KV cache; a token crosses
    # the pipeline stages one after another.
    step_bytes = weights + kv_needed
    floor_s = pp * step_bytes / hw.accelerator.hbm_bytes_per_s
    tokens_per_s = req.concurrency / floor_s if floor_s else 0.0
    cost = hw.price_usd_per_hour * nodes if hw.price_usd_per_hour is not None else None
    cost_per_m = cost / (tokens_per_s * 3600) * 1e6 if cost is not None and tokens_per_s else None
    fetch_bps = min(hw.network_gbps or FETCH_GBPS_CAP, FETCH_GBPS_CAP) * 1e9 / 8
    cold_start = full / fetch_bps + node_weights / LOAD_BYTES_PER_S

    return Plan(
        fits=not reasons, model=req.model_id, engine=req.engine, accelerator=hw.accelerator.id,
        instance=hw.instance, quantization=req.quantization, dtype=req.dtype, nodes=nodes,
        gpus_per_node=per_node, tensor_parallel=tp, pipeline_parallel=pp,
        per_gpu_bytes=PerDeviceBytes(weights=weights, kv_cache=kv_needed, overhead=overhead, total=total,
                                     capacity=capacity),
        overhead_breakdown=overhead_parts, parameters=arch.total_params, weights_total_bytes=full,
        max_kv_tokens=int(max_kv_tokens), kv_bytes_per_token_per_gpu=kv_per_token,
        decode_ms_per_token_floor=floor_s * 1000, tokens_per_s_ceiling=tokens_per_s,
        cost_usd_per_hour=cost, cost_usd_per_million_tokens=cost_per_m, price_date=hw.price_date,
        cold_start_s=cold_start, replicas=req.replicas, total_nodes=nodes * req.replicas,
        total_devices=nodes * per_node * req.replicas,
        total_cost_usd_per_hour=cost * req.replicas if cost is not None else None,
        total_tokens_per_s_ceiling=tokens_per_s * req.replicas, device_memory_bytes=device_memory,
        slice_hosts=hw.slice_hosts,
        reasons=reasons, notes=notes)


def lora_bytes(arch: Architecture, layers: int, slots: int, rank: int, dtype_bytes: int, tp: int) -> int:
    """What vLLM reserves for LoRA adapters on a device: for each slot, A (in x r) and B (r x out) of every
    linear layer an adapter may target, at the serving dtype. Tensor parallelism shards one side of each
    pair as it shards the layer: B of the column-parallel q, k, v, gate and up; A of the row-parallel o
    and down."""
    h, q, kv, i = arch.hidden_size, arch.num_attention_heads * arch.head_dim, \
        arch.num_key_value_heads * arch.head_dim, arch.intermediate_size
    column = 5 * h + (q + 2 * kv + 2 * i) / tp      # q, k, v, gate, up: A whole, B sharded
    row = 2 * h + (q + i) / tp                       # o, down: A sharded, B whole
    return int(slots * rank * (column + row) * layers * dtype_bytes)


def plan(req: PlanRequest, suggest: bool = True) -> Plan:
    arch, hw = req.architecture, req.hardware
    tp = req.tensor if req.tensor != "auto" else auto_tensor(arch, hw)
    if req.pipeline != "auto":
        candidates = [req.pipeline]
    elif hw.slice_hosts is not None and req.nodes == "auto":
        candidates = [hw.slice_hosts]   # a slice is provisioned whole: every host serves
    elif req.nodes != "auto":
        # Within a node: TP; across nodes: one pipeline stage per node (what vLLM recommends).
        candidates = [req.nodes]
    else:
        candidates = list(range(1, min(hw.max_nodes, arch.num_hidden_layers) + 1))
    result = _evaluate(req, tp, candidates[0])
    for pp in candidates[1:]:
        if result.fits:
            break
        result = _evaluate(req, tp, pp)
    if req.pipeline == "auto" and req.nodes == "auto" and not result.fits and hw.slice_hosts is None:
        result = _evaluate(req, tp, 1)  # report against the simplest shape
        if req.replicas > 1 and hw.hosts:
            # On-prem replicas share the hosts: when one group would fit on more of them, say that the
            # replicas are what does not fit (rather than the memory of the simplest shape).
            pooled = replace(req, hardware=replace(hw, max_nodes=hw.hosts))
            for pp in range(hw.max_nodes + 1, min(hw.hosts, arch.num_hidden_layers) + 1):
                wider = _evaluate(pooled, tp, pp)
                if all("replicas" in reason for reason in wider.reasons):
                    result = wider
                    break
    if req.tensor == "auto":
        result.notes.insert(0, _auto_note(arch, hw, tp))
    if not result.fits and suggest:
        result.suggestions = suggestions(req)
    return result


def suggestions(req: PlanRequest, limit: int = 6) -> list[Suggestion]:
    """The cheapest catalog configurations that fit this model and context."""
    quantizations = [req.quantization] + [q for q in ("none", "fp8", "int8") if q != req.quantization]
    if req.hardware.accelerator.is_tpu:
        quantizations = [q for q in quantizations if q != "fp8"]
    found: list[Suggestion] = []
    on_tpu = req.hardware.accelerator.is_tpu
    for inst in catalog.instances().values():
        # A TPU plan is answered with TPU slices, a GPU or CPU one with GPU instances (their engines differ).
        if catalog.accelerator(inst.accelerator).is_tpu != on_tpu:
            continue
        for quant in quantizations:
            hw = Hardware.from_instance(inst.id, max_nodes=DEFAULT_MAX_NODES)
            candidate = replace(req, hardware=hw, quantization=quant, tensor="auto", pipeline="auto",
                                nodes="auto", dtype="bfloat16" if req.dtype == "float32" else req.dtype)
            p = plan(candidate, suggest=False)
            if p.fits and p.cost_usd_per_hour is not None:   # every catalog instance has a price
                found.append(Suggestion(inst.id, p.nodes, quant, p.tensor_parallel, p.pipeline_parallel,
                                        round(p.cost_usd_per_hour, 2), inst.price_date))
    found.sort(key=lambda s: (s.cost_usd_per_hour, s.quantization != req.quantization))
    return found[:limit]
