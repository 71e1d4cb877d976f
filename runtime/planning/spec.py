"""The deployment spec: one YAML file in environments/ = one deployment.

Validation turns every pydantic error into one line that names the file, the field, the value and what
is allowed (the CLI exits 2 with it). Cross-field checks that need the catalog (TP divides the heads,
context within the model's maximum) live here too, so that every command refuses the same bad input.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic_core import ErrorDetails

from runtime.planning import catalog
from runtime.errors import UserError, closest

Auto = Literal["auto"]
Target = Literal["local", "onprem", "aws", "gcp"]
Dtype = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["none", "fp8", "int8", "int4"]
Engine = Literal["transformers", "vllm"]


class Strict(BaseModel):
    # Defaults are given as Field(default=...): type checkers read only the keyword, so a positional
    # default would make the field look required to them (and `LocalSection()` a missing argument).
    model_config = ConfigDict(extra="forbid", frozen=True)


# The LoRA ranks vLLM can reserve (`--max-lora-rank`); an adapter's rank is served in the next one up.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterSection(Strict):
    """A LoRA adapter of the model (a fine-tuned or distilled variant), served beside the base model and
    chosen per request by `model: NAME`. Fetched and verified like the weights (its directory holds
    adapter_config.json and the adapter's safetensors)."""
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    source: str = Field(description="hf://org/repo[@rev] | s3://b/p | gs://b/p | file:///p")
    rank: Annotated[int, Field(ge=1, le=512)] = Field(default=16, description="its LoRA rank (r) or more: "
                                                     "the planner counts the memory, vLLM reserves it")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value.startswith("pypi:"):
            raise ValueError("adapters come from hf://, s3://, gs:// or file:// (pypi:// is for the embedded model)")
        return value


class ModelSection(Strict):
    id: str = Field(description="catalog id, or 'config:PATH' to read the architecture from a config.json")
    source: str | None = Field(default=None,
                               description="hf://org/repo[@rev] | s3://b/p | gs://b/p | file:///p | pypi://pkg")
    dtype: Dtype | Auto = Field(default="bfloat16", description="auto: the checkpoint's type on GPUs; on CPUs "
                                "bf16 where computed natively, else float32")
    quantization: Quantization = "none"
    kv_cache_dtype: Literal["auto", "bfloat16", "float16", "float32", "fp8"] = "auto"
    adapters: list[AdapterSection] = Field(default_factory=list, description="LoRA adapters (engine vllm)")

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, value: list[AdapterSection]) -> list[AdapterSection]:
        names = [a.name for a in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"adapter names must be unique; {', '.join(twice)} given more than once")
        return value

    @property
    def lora_rank(self) -> int:
        """`--max-lora-rank`: the smallest rank vLLM reserves that holds every adapter's."""
        wanted = max((a.rank for a in self.adapters), default=0)
        return next(r for r in LORA_RANKS if r >= wanted) if wanted else 0


class ContextSection(Strict):
    max_model_len: Annotated[int, Field(ge=16)] = 8192
    concurrency: Annotated[int, Field(ge=1, le=4096)] = 8
    # Largest prompt batch prefilled at once (tokens); bounds the activation peak the planner reserves.
    max_prefill_tokens: Annotated[int, Field(ge=16)] = 8192


class ParallelismSection(Strict):
    tensor: Union[Auto, Annotated[int, Field(ge=1)]] = "auto"
    pipeline: Union[Auto, Annotated[int, Field(ge=1)]] = "auto"
    nodes: Union[Auto, Annotated[int, Field(ge=1)]] = "auto"


class TlsSection(Strict):
    """How the endpoint serves TLS. Without a certificate named here herd makes the deployment's own CA
    and server certificate (runtime/serving/tls.py). Each of cert, key and ca is a PEM file on the machine that
    deploys (herd hands it to the node the way it hands over the API key), or, for cert and key, the
    name of the cloud's secret holding it: ssm:NAME (an SSM SecureString, aws) or secretmanager:NAME
    (Secret Manager, gcp), which the node reads at boot."""
    # auto: HTTPS whenever the bind address is not loopback, plain HTTP on loopback; on: HTTPS always.
    mode: Literal["auto", "on"] = "auto"
    cert: str | None = Field(default=None,
                             description="server certificate chain: PEM file, ssm:NAME or secretmanager:NAME")
    key: str | None = Field(default=None,
                            description="its private key: PEM file (0600), ssm:NAME or secretmanager:NAME")
    ca: str | None = Field(default=None, description="PEM file of the CA that signed cert, for herd's clients "
                                                     "(default: the system's trust store)")
    sans: list[str] = Field(default=[], description="more DNS names or IP addresses for the generated certificate")

    @field_validator("sans")
    @classmethod
    def _sans(cls, values: list[str]) -> list[str]:
        from runtime.serving.tls import check_san
        return [check_san(v) for v in values]

    @model_validator(mode="after")
    def _pair(self):
        if bool(self.cert) != bool(self.key):
            given, missing = ("cert", "key") if self.cert else ("key", "cert")
            raise ValueError(f"serving.tls.{given} needs serving.tls.{missing} too (a certificate and its key, "
                             "or neither: then herd makes the deployment's own CA)")
        if self.ca and not self.cert:
            raise ValueError("serving.tls.ca applies only with serving.tls.cert (herd's own CA is kept in the "
                             "deployment's state)")
        if self.sans and self.cert:
            raise ValueError("serving.tls.sans applies only to the certificate herd makes; the named "
                             "serving.tls.cert carries its own names")
        from runtime.serving.tls import is_secret_reference
        if self.ca and is_secret_reference(self.ca):
            raise ValueError(f"serving.tls.ca: {self.ca!r}: must be a PEM file (clients read it locally)")
        return self


GuardScreen = Literal["prompt", "answer"]


class CanarySection(Strict):
    """The canary generation that gates readiness and detects a hung engine (herd serve's --canary-*
    flags, which win over these). A group restarts after `retries` + 1 canaries in a row time out while
    no request gets a token: an engine that can stall longer than that on work it is doing (vLLM's CPU
    build compiling for a request shape it has not seen, on a loaded host) needs a longer timeout."""
    interval_s: Annotated[float, Field(gt=0)] = 10.0
    timeout_s: Annotated[float, Field(gt=0)] = 5.0
    retries: Annotated[int, Field(ge=0)] = 2


class GuardSection(Strict):
    """A guard model that screens the traffic at herd's front (runtime/serving/guard.py): a Llama Guard
    3-style model behind an OpenAI-compatible /v1/chat/completions, answering `safe`, or `unsafe` and a
    line of category codes (S1..S14). Either herd serves it (`model`, with `source` for its weights: a
    second vLLM on the head, on loopback, supervised like the engine, its memory counted by the planner
    next to the served model's), or it is served apart and given by `url` (e.g. `vllm serve
    meta-llama/Llama-Guard-3-8B` on another host), reachable from every head that serves."""
    url: str | None = Field(default=None, description="the guard's OpenAI-compatible server, such as "
                            "http://127.0.0.1:8200 (herd posts to its /v1/chat/completions)")
    model: str | None = Field(default=None, description="a guard herd serves itself on the head with vLLM: "
                              "catalog id (llama-guard-3-8b) or 'config:PATH'")
    source: str | None = Field(default=None, description="the weights of the guard herd serves, fetched and "
                               "verified as model.source's are")
    max_model_len: Annotated[int, Field(ge=16)] = Field(default=4096, description="the served guard's context: "
                                                        "the longest conversation it screens, in tokens")
    chat_template: str | None = Field(default=None, description="the served guard's chat template (Jinja, "
                                      "inline): Llama Guard's prompt with a policy of your own categories, "
                                      "say; default: the guard checkpoint's own")
    served_model_name: str | None = Field(default=None, description="the name the guard serves under "
                                          "(default: the first model its /v1/models lists)")
    api_key_env: str | None = Field(default=None, description="environment variable holding the guard's "
                                    "API key, when it has one")
    # Prompts only by default: screening answers holds a streamed answer back until it is complete.
    screen: Annotated[list[GuardScreen], Field(min_length=1)] = Field(default=["prompt"],
                                                                      description="prompt, answer or both")
    on_error: Literal["closed", "open"] = Field(default="closed", description="a guard that is down, times "
                                                "out or answers something unparsable: closed refuses the "
                                                "request (503), open lets it through unscreened (logged, counted)")
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be an http:// or https:// URL of the guard's server, such as "
                             "http://127.0.0.1:8200")
        return value

    @field_validator("screen")
    @classmethod
    def _screen(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("names prompt or answer twice (allowed: [prompt], [answer], [prompt, answer])")
        return values

    @model_validator(mode="after")
    def _served_by(self):
        if self.url is not None and self.model is not None:
            raise ValueError("serving.guard: gives both url and model; allowed: url (a guard served apart) or "
                             "model (herd serves it on the head)")
        if self.url is None and self.model is None:
            raise ValueError("serving.guard: needs url (a guard served apart, such as http://127.0.0.1:8200) or "
                             "model (herd serves it on the head, such as llama-guard-3-8b)")
        for served_only in ("source", "chat_template"):
            if getattr(self, served_only) is not None and self.model is None:
                raise ValueError(f"serving.guard.{served_only}: is for a guard herd serves; give "
                                 "serving.guard.model too (a guard at url has its own)")
        return self

    @property
    def served_here(self) -> bool:
        """herd runs this guard itself (a second vLLM on the head)."""
        return self.model is not None

    @property
    def model_section(self) -> ModelSection:
        """The served guard as a model: its architecture, weights and where they land are found as the
        served model's are."""
        assert self.model is not None
        return ModelSection(id=self.model, source=self.source)


class ServingSection(Strict):
    engine: Engine = "transformers"
    canary: CanarySection = Field(default_factory=CanarySection)
    # transformers engine: continuous batching, or a static KV cache with CUDA-graph decode (GPUs).
    decode: Literal["continuous", "static"] = "continuous"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    api_key_env: str | None = Field(default=None, description="environment variable holding the API key")
    api_key_file: str | None = Field(default=None, description="file holding the API key")
    gpu_memory_utilization: Annotated[float, Field(gt=0.1, le=0.98)] = 0.90
    # Prometheus on the head with herd's scrape config, alert rules and dashboard (step 90-monitoring).
    monitoring: bool = False
    served_model_name: str | None = None
    tls: TlsSection = TlsSection()
    guard: GuardSection | None = Field(default=None, description="a guard model screening prompts "
                                      "and answers at the front (none by default)")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if value != "localhost":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError("must be an IP address (127.0.0.1, 0.0.0.0, ...) or localhost") from None
        return value

    @property
    def loopback_only(self) -> bool:
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback

    @property
    def runs_vllm(self) -> bool:
        """Some process of this deployment is vLLM: the engine, or a guard herd serves (provisioning
        installs vLLM's venv then)."""
        return self.engine == "vllm" or (self.guard is not None and self.guard.served_here)

    @property
    def tls_enabled(self) -> bool:
        """HTTPS: off loopback always (the bearer key would cross the network in clear), and wherever
        the spec asks for it or names a certificate. Plain HTTP remains only on loopback binds."""
        return not self.loopback_only or self.tls.mode == "on" or self.tls.cert is not None


class LocalSection(Strict):
    ranks: Annotated[int, Field(ge=1, le=64)] | None = Field(default=None,
                                                           description="CPU ranks; default = parallelism.tensor")
    threads_per_rank: Annotated[int, Field(ge=1)] | None = None
    state_dir: str = ".herd"


def _cidrs(values: list[str]) -> list[str]:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not a CIDR block such as 203.0.113.0/24") from None
    return values


class AwsSection(Strict):
    region: str
    instance_type: str
    availability_zones: list[str] = []
    allowed_cidrs: list[str] = Field(description="who may reach the API and SSH; 0.0.0.0/0 only if written")
    weights_bucket: str | None = None
    capacity_reservation_id: str | None = None
    capacity_block: bool = Field(default=False, description="the reservation is an EC2 Capacity Block for ML")
    spot: bool = False
    subnet_id: str | None = Field(default=None, description="an existing subnet (its VPC is used); default: a new VPC")
    ssh_key_name: str | None = None
    root_volume_gb: Annotated[int, Field(ge=50)] | None = None
    ami_name_pattern: str = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 22.04) *"
    ami_owners: Annotated[list[str], Field(min_length=1)] = ["amazon"]   # "self" or account ids: your own AMIs

    _check_cidrs = field_validator("allowed_cidrs")(classmethod(lambda cls, v: _cidrs(v)))

    @model_validator(mode="after")
    def _market(self):
        if self.capacity_block and not self.capacity_reservation_id:
            raise ValueError("aws.capacity_block needs aws.capacity_reservation_id (the block's cr-... id)")
        if self.spot and self.capacity_reservation_id:
            raise ValueError("aws.spot and aws.capacity_reservation_id exclude each other: choose one")
        return self


class GcpSection(Strict):
    project: str
    zone: str
    machine_type: str
    allowed_cidrs: list[str]
    weights_bucket: str | None = None
    spot: bool = False
    image_project: str = "deeplearning-platform-release"
    image_family: str = "common-cu128-ubuntu-2204-nvidia-570"
    boot_disk_gb: Annotated[int, Field(ge=50)] | None = None
    # TPU slices (machine_type v5e-8, v5p-16, v6e-16, ...): the TPU VM software version (default: the
    # catalog's for the generation) and reserved capacity instead of on-demand.
    tpu_runtime_version: str | None = None
    reserved: bool = False
    # TPU VMs boot from a 100 GiB disk: a larger checkpoint is served from a disk holding the weights
    # (Hyperdisk ML on v6e, Balanced PD on v5e/v5p, filled once, e.g. with `herd weights fetch` on a VM
    # that has it read-write), attached read-only to every host of the slice.
    weights_disk: str | None = Field(default=None, description="projects/P/zones/Z/disks/NAME")

    _check_cidrs = field_validator("allowed_cidrs")(classmethod(lambda cls, v: _cidrs(v)))


class OnpremHost(Strict):
    address: str
    user: str = "root"
    port: Annotated[int, Field(ge=1, le=65535)] = 22


class LoadBalancerSection(Strict):
    """The on-prem host that runs HAProxy in front of the replicas (Debian's package, installed over SSH)."""
    address: str
    user: str = "root"
    port: Annotated[int, Field(ge=1, le=65535)] = Field(default=22, description="SSH port")
    listen_address: str = "0.0.0.0"
    listen_port: Annotated[int, Field(ge=1, le=65535)] = 443
    pem_file: str | None = Field(default=None, description="certificate chain + private key in one PEM file, on "
                                 "the machine running herd; uploaded to the balancer")
    config_dir: str = Field("/etc/haproxy", description="haproxy.cfg and the certificate; Debian's own "
                            "(its haproxy.service then runs it). Elsewhere HAProxy runs as one managed process")
    run_dir: str = Field("/run/haproxy", description="the admin socket and pid file")

    @field_validator("listen_address")
    @classmethod
    def _listen(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("must be an IP address (0.0.0.0, 10.0.0.5, ...)") from None
        return value


class OnpremSection(Strict):
    hosts: Annotated[list[OnpremHost], Field(min_length=1)]
    load_balancer: LoadBalancerSection | None = Field(default=None, description="HAProxy in front of the replicas")
    ssh_key: str = "~/.ssh/id_ed25519"
    known_hosts: str = "~/.ssh/known_hosts"
    accelerator: str = "h100-80gb"
    gpus_per_host: Annotated[int, Field(ge=0, le=16)] = 8   # 0: CPU-only hosts (GPU steps skipped)
    cpu_ranks_per_host: Annotated[int, Field(ge=1, le=64)] = 1
    host_ram_gib: Annotated[float, Field(gt=0)] | None = None
    disk_gib: Annotated[float, Field(gt=0)] | None = None
    install_dir: str = "/opt/herd"


class Spec(Strict):
    name: str
    target: Target
    model: ModelSection
    # N independent serving groups of the planned shape, behind a load balancer (default: one group).
    replicas: Annotated[int, Field(ge=1, le=64)] = 1
    context: ContextSection = ContextSection()
    parallelism: ParallelismSection = ParallelismSection()
    serving: ServingSection = ServingSection()
    local: LocalSection | None = None
    aws: AwsSection | None = None
    gcp: GcpSection | None = None
    onprem: OnpremSection | None = None

    @model_validator(mode="after")
    def _target_section(self) -> Spec:
        for section in get_args(Target):
            present = getattr(self, section) is not None
            if section != self.target and present:
                raise ValueError(f"section {section!r} given but target is {self.target!r}; "
                                 f"only the {self.target!r} section applies")
        if self.target != "local" and getattr(self, self.target) is None:
            raise ValueError(f"target {self.target!r} needs its own section: add '{self.target}:' "
                             "with its settings")
        if self.replicas > 1 and self.onprem is not None:   # the target is onprem (checked above)
            if self.onprem.load_balancer is None:
                raise ValueError(f"replicas: {self.replicas} needs onprem.load_balancer (address: the host "
                                 "that runs HAProxy in front of the replicas)")
            if self.replicas > len(self.onprem.hosts):
                raise ValueError(f"replicas: {self.replicas} groups need at least {self.replicas} hosts, "
                                 f"onprem.hosts lists {len(self.onprem.hosts)}")
        if self.model.adapters:
            if self.serving.engine != "vllm":
                raise ValueError(f"model.adapters: LoRA adapters are served by engine 'vllm'; serving.engine is "
                                 f"{self.serving.engine!r}")
            base = self.serving.served_model_name or self.model.id
            clash = [a.name for a in self.model.adapters if a.name == base]
            if clash:
                raise ValueError(f"model.adapters: {clash[0]!r} is the base model's own name; name the adapter "
                                 "otherwise (requests choose it by `model`)")
        return self

    # The target's own section, never None: code that runs for one target (its cluster, its preflight,
    # its steps) reads these instead of the Optional fields. The validator above makes the section
    # present whenever the target is its own; asked of another target's spec, they say so.
    @property
    def aws_section(self) -> AwsSection:
        return _present(self.aws, "aws", self.target)

    @property
    def gcp_section(self) -> GcpSection:
        return _present(self.gcp, "gcp", self.target)

    @property
    def onprem_section(self) -> OnpremSection:
        return _present(self.onprem, "onprem", self.target)

    @property
    def target_section(self) -> Any:
        return getattr(self, self.target) or (LocalSection() if self.target == "local" else None)

    @property
    def instance_type(self) -> str | None:
        """The cloud's instance (AWS) or machine (GCP) type; None off the clouds."""
        if self.target == "aws":
            return self.aws_section.instance_type
        if self.target == "gcp":
            return self.gcp_section.machine_type
        return None


SectionT = TypeVar("SectionT", bound=Strict)


def _present(section: SectionT | None, name: str, target: str) -> SectionT:
    if section is None:
        raise UserError(f"this needs the {name!r} section, and the spec's target is {target!r}")
    return section


# ---------- loading with one-line errors ----------

def _field_path(loc: tuple) -> str:
    # Drop pydantic's union-branch tags ("int", "constrained-int", "literal['auto']", ...): real
    # field names are identifiers, list positions are ints.
    parts = [str(p) for p in loc
             if isinstance(p, int) or (p.isidentifier() and p not in ("int", "str", "float", "bool"))]
    return ".".join(parts) or "(top level)"


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Spec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            continue
        for candidate in (field.annotation, *get_args(field.annotation)):
            for inner in (candidate, *get_args(candidate)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
    return list(model.model_fields)


def _one_line(where: str, errors: list[ErrorDetails]) -> str:
    """The first failing field, as one line. Union branches ('auto' or an int) each report: join them."""
    error = errors[0]
    loc = error["loc"]
    field = _field_path(loc)
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        near = closest(str(loc[-1]), allowed)
        hint = f"; did you mean {near[0]}?" if near else ""
        return f"{where}: {field}: unknown key{hint} (allowed: {', '.join(allowed)})"
    if error["type"] == "missing":
        return f"{where}: {field}: required field is missing"
    messages = dict.fromkeys(e["msg"].removeprefix("Value error, ")
                             for e in errors if _field_path(e["loc"]) == field)
    if not loc or isinstance(value, dict):  # a rule over a whole file or section: the message names fields
        return f"{where}: {' or '.join(messages)}"
    shown = value
    return f"{where}: {field}: {shown!r}: {' or '.join(messages)}"


def parse_spec(data: Any, where: str) -> Spec:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of sections (name, target, model, ...), "
                        f"got {type(data).__name__}")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as invalid:
        raise UserError(_one_line(where, invalid.errors())) from None
    check_against_catalog(spec, where)
    return spec


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (environments live in environments/*.yaml)") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected an environment YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as bad:
        mark = getattr(bad, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(bad, "problem", None) or str(bad)
        raise UserError(f"{path}: unreadable YAML{line}: {problem}") from None
    return parse_spec(data, str(path))


def resolve_architecture(spec_model: ModelSection, field: str = "model.id"):
    """The architecture a model id names: catalog id, or 'config:PATH' to any config.json."""
    from runtime.planning.architecture import Architecture
    if spec_model.id.startswith("config:"):
        return Architecture.from_config_json(spec_model.id.removeprefix("config:"))
    return catalog.model(spec_model.id, field).architecture


def check_tpu(spec: Spec, inst, where: str) -> None:
    """A TPU slice serves with vLLM's TPU backend, every host of the slice one pipeline stage."""
    if spec.serving.engine != "vllm":
        raise UserError(f"{where}: serving.engine: {spec.serving.engine!r} on the TPU slice {inst.id}: herd's built-in "
                        "engine runs on CUDA GPUs and CPUs (allowed on TPUs: vllm)")
    nodes = spec.parallelism.nodes
    if nodes != "auto" and nodes != inst.hosts:
        raise UserError(f"{where}: parallelism.nodes: {nodes}, but a {inst.id} slice is {inst.hosts} host(s) "
                        f"(allowed: auto, {inst.hosts})")
    if spec.model.quantization == "fp8":
        raise UserError(f"{where}: model.quantization: 'fp8' on the TPU slice {inst.id}: TPUs have no FP8 "
                        "(allowed: none, int8, int4)")
    if spec.serving.guard is not None and spec.serving.guard.served_here:
        raise UserError(f"{where}: serving.guard.model on the TPU slice {inst.id}: herd serves a guard beside "
                        "the model on GPUs and CPUs only; serve it apart and give serving.guard.url")


def check_against_catalog(spec: Spec, where: str) -> None:
    try:
        arch = resolve_architecture(spec.model)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    if spec.context.max_model_len > arch.max_position_embeddings:
        raise UserError(f"{where}: context.max_model_len: {spec.context.max_model_len} is above the "
                        f"model's maximum (allowed: 16..{arch.max_position_embeddings})")
    guard = spec.serving.guard
    if guard is not None and guard.served_here:
        try:
            guard_arch = resolve_architecture(guard.model_section, "serving.guard.model")
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        if guard.max_model_len > guard_arch.max_position_embeddings:
            raise UserError(f"{where}: serving.guard.max_model_len: {guard.max_model_len} is above the guard "
                            f"model's maximum (allowed: 16..{guard_arch.max_position_embeddings})")
    tp = spec.parallelism.tensor
    if tp != "auto" and not arch.valid_tensor_parallel(tp):
        choices = ", ".join(map(str, arch.tensor_parallel_choices(max(64, tp))))
        raise UserError(f"{where}: parallelism.tensor: {tp} does not divide the model's "
                        f"{arch.num_attention_heads} attention / {arch.num_key_value_heads} KV heads "
                        f"(allowed: auto, {choices})")
    pp = spec.parallelism.pipeline
    if pp != "auto" and pp > arch.num_hidden_layers:
        raise UserError(f"{where}: parallelism.pipeline: {pp} is more stages than the model's "
                        f"{arch.num_hidden_layers} layers (allowed: auto, 1..{arch.num_hidden_layers})")
    section = spec.target_section
    if spec.target == "aws":
        inst = catalog.instance(section.instance_type, f"{where}: aws.instance_type")
        if inst.cloud != "aws":
            raise UserError(f"{where}: aws.instance_type: {inst.id!r} is a {inst.cloud} machine type")
    if spec.target == "gcp":
        inst = catalog.instance(section.machine_type, f"{where}: gcp.machine_type")
        if inst.cloud != "gcp":
            raise UserError(f"{where}: gcp.machine_type: {inst.id!r} is an {inst.cloud} instance type")
        if catalog.accelerator(inst.accelerator).is_tpu:
            check_tpu(spec, inst, where)
    if spec.target == "onprem":
        catalog.accelerator(section.accelerator, f"{where}: onprem.accelerator")
        nodes = spec.parallelism.nodes
        if nodes != "auto" and nodes * spec.replicas > len(section.hosts):
            if spec.replicas == 1:
                raise UserError(f"{where}: parallelism.nodes: {nodes} is more than the {len(section.hosts)} "
                                f"hosts listed in onprem.hosts")
            raise UserError(f"{where}: parallelism.nodes: {nodes} per replica x replicas {spec.replicas} = "
                            f"{nodes * spec.replicas} hosts, onprem.hosts lists {len(section.hosts)}")
    from runtime.serving.tls import SECRET_PREFIXES
    for field in ("cert", "key"):
        value = getattr(spec.serving.tls, field) or ""
        for prefix, cloud in SECRET_PREFIXES.items():
            if value.startswith(prefix) and spec.target != cloud:
                raise UserError(f"{where}: serving.tls.{field}: {value!r}: {prefix}NAME is the {cloud} target's "
                                f"secret store, and the target is {spec.target!r} (allowed: a PEM file"
                                + (f", or {next(p for p, c in SECRET_PREFIXES.items() if c == spec.target)}NAME"
                                   if spec.target in SECRET_PREFIXES.values() else "") + ")")
            if value == prefix:
                raise UserError(f"{where}: serving.tls.{field}: {value!r}: names no secret (allowed: {prefix}NAME)")
    if not spec.serving.loopback_only and not (spec.serving.api_key_env or spec.serving.api_key_file):
        raise UserError(f"{where}: serving.host: {spec.serving.host!r} is not loopback, so an API key is "
                        "required: set serving.api_key_env or serving.api_key_file")
