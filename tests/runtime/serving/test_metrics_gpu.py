"""GPU telemetry: what NVML reports becomes per-device series; absent cleanly where there is no GPU.

This host has no GPU, so the collection code runs against a small stand-in for the pynvml module
(the hardware cannot exist here; the collector under test is the real one). The stand-in keeps
pynvml's shapes: NVMLError with .value, handles, utilization/memory structs, an event set that
queues XID events and raises NVML_ERROR_TIMEOUT when empty.
"""
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runtime.serving.gpu_telemetry import GpuCollector
from runtime.serving.metrics import Metrics

GIB = 2**30


class FakeNvml:
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    nvmlEventTypeXidCriticalError = 0x8

    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, devices, init_error=None, xid_unsupported=(), no_ecc=()):
        self.devices = devices            # index -> dict of readings
        self.init_error = init_error
        self.xid_unsupported = set(xid_unsupported)
        self.no_ecc = set(no_ecc)
        self.lost: set[int] = set()
        self.queue: list = []
        self.registered: set[int] = set()
        self.init_calls = 0

    # --- the calls GpuCollector makes
    def nvmlInit(self):
        self.init_calls += 1
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return SimpleNamespace(index=i)

    def _dev(self, h):
        if h.index in self.lost:
            raise self.NVMLError(self.NVML_ERROR_GPU_IS_LOST)
        return self.devices[h.index]

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h.index:04d}".encode()

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlSystemGetDriverVersion(self):
        return "570.86.15"

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self._dev(h)["util"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        d = self._dev(h)
        return SimpleNamespace(used=d["used"], total=d["total"], free=d["total"] - d["used"])

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._dev(h)["temp"]

    def nvmlDeviceGetPowerUsage(self, h):
        return self._dev(h)["milliwatts"]

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        assert (kind, counter) == (self.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, self.NVML_VOLATILE_ECC)
        if h.index in self.no_ecc:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return self._dev(h)["ecc"]

    def nvmlEventSetCreate(self):
        return "event-set"

    def nvmlDeviceRegisterEvents(self, h, types, event_set):
        assert types & self.nvmlEventTypeXidCriticalError and event_set == "event-set"
        if h.index in self.xid_unsupported:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        self.registered.add(h.index)

    def nvmlEventSetWait(self, event_set, timeout_ms):
        assert timeout_ms == 0, "a scrape must never wait for events"
        if not self.queue:
            raise self.NVMLError(self.NVML_ERROR_TIMEOUT)
        return self.queue.pop(0)

    def nvmlDeviceGetIndex(self, h):
        return h.index

    # --- what the test does to the hardware
    def xid(self, index, code):
        self.queue.append(SimpleNamespace(device=SimpleNamespace(index=index),
                                          eventType=self.nvmlEventTypeXidCriticalError, eventData=code))


def two_gpus(**kw) -> FakeNvml:
    return FakeNvml({0: {"util": 87, "used": 70 * GIB, "total": 80 * GIB, "temp": 64, "milliwatts": 512_345, "ecc": 0},
                     1: {"util": 3, "used": 1 * GIB, "total": 80 * GIB, "temp": 41, "milliwatts": 98_000, "ecc": 2}},
                    **kw)


def scrape(collector) -> dict:
    """The collector through a real registry and prometheus_client's own exposition and parser."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, s.labels.get("gpu")): s for f in text_string_to_metric_families(text) for s in f.samples}


def test_per_device_gauges_follow_nvml():
    samples = scrape(GpuCollector(two_gpus()))
    assert samples[("herd_gpu_utilization_ratio", "0")].value == 0.87
    assert samples[("herd_gpu_utilization_ratio", "1")].value == 0.03
    assert samples[("herd_gpu_memory_used_bytes", "0")].value == 70 * GIB
    assert samples[("herd_gpu_memory_total_bytes", "1")].value == 80 * GIB
    assert samples[("herd_gpu_temperature_celsius", "0")].value == 64
    assert samples[("herd_gpu_power_watts", "0")].value == 512.345
    assert samples[("herd_gpu_ecc_uncorrected_volatile_errors", "1")].value == 2
    assert samples[("herd_gpu_up", "1")].value == 1
    assert samples[("herd_gpu_utilization_ratio", "1")].labels["uuid"] == "GPU-0001"
    info = samples[("herd_gpu_info", "0")].labels
    assert info["name"] == "NVIDIA H100 80GB HBM3" and info["driver"] == "570.86.15"
    # The XID counter exists from the start (at 0), so that increase() sees the first event.
    assert samples[("herd_gpu_xid_errors_total", "0")].value == 0
    assert samples[("herd_gpu_last_xid", "1")].value == 0


def test_xid_events_are_counted_per_device_without_waiting():
    nvml = two_gpus()
    collector = GpuCollector(nvml)
    scrape(collector)
    nvml.xid(1, 79)    # fell off the bus
    nvml.xid(1, 48)    # double-bit ECC
    nvml.xid(0, 13)
    samples = scrape(collector)
    assert samples[("herd_gpu_xid_errors_total", "1")].value == 2
    assert samples[("herd_gpu_last_xid", "1")].value == 48
    assert samples[("herd_gpu_xid_errors_total", "0")].value == 1
    assert samples[("herd_gpu_last_xid", "0")].value == 13
    assert nvml.queue == []
    # Counts persist across scrapes (a counter), and NVML is initialised once.
    assert scrape(collector)[("herd_gpu_xid_errors_total", "1")].value == 2
    assert nvml.init_calls == 1


def test_unsupported_readings_are_left_out_for_that_device_only():
    nvml = two_gpus(xid_unsupported={1}, no_ecc={0})
    samples = scrape(GpuCollector(nvml))
    assert ("herd_gpu_ecc_uncorrected_volatile_errors", "0") not in samples
    assert samples[("herd_gpu_ecc_uncorrected_volatile_errors", "1")].value == 2
    assert ("herd_gpu_xid_errors_total", "1") not in samples
    assert ("herd_gpu_xid_errors_total", "0") in samples


def test_a_lost_device_reports_down_and_the_others_still_report():
    nvml = two_gpus()
    collector = GpuCollector(nvml)
    scrape(collector)
    nvml.lost.add(0)
    samples = scrape(collector)
    assert samples[("herd_gpu_up", "0")].value == 0
    assert ("herd_gpu_utilization_ratio", "0") not in samples and ("herd_gpu_temperature_celsius", "0") not in samples
    assert samples[("herd_gpu_utilization_ratio", "1")].value == 0.03


def test_no_driver_means_no_series_and_no_error():
    nvml = FakeNvml({}, init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    collector = GpuCollector(nvml)
    assert scrape(collector) == {} and scrape(collector) == {}
    assert nvml.init_calls == 1 and not collector.available and "NVML unavailable" in collector.reason


def test_this_cpu_host_through_the_real_pynvml_has_no_gpu_series():
    import pynvml   # nvidia-ml-py is a dependency: importable on every host, GPU or not
    try:
        pynvml.nvmlInit()
        gpus = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError:
        gpus = 0
    collector = GpuCollector()
    fams = scrape(collector)
    assert bool(fams) == bool(gpus), (gpus, collector.reason)
    # herd's own registry (the process-wide collector included) renders, with or without GPUs.
    text = Metrics().render(queue_depth=0, ready=True)
    gpu_lines = [line for line in text.splitlines() if line.startswith("herd_gpu_")]
    assert bool(gpu_lines) == bool(gpus) and "herd_ready 1.0" in text
