"""GPU gauges through NVML (nvidia-ml-py, imported as `pynvml`), per device, for herd's /metrics.

What a scrape carries on a GPU host, labelled `gpu` (NVML index) and `uuid` (the board, for RMAs):
- herd_gpu_up                               1 when the device answered this scrape (0: fell off the bus, ...)
- herd_gpu_utilization_ratio                share of the last sample period a kernel ran (0..1)
- herd_gpu_memory_used_bytes / _total_bytes device memory (NVML's view: every process, the CUDA context)
- herd_gpu_temperature_celsius              core temperature
- herd_gpu_power_watts                      board power draw
- herd_gpu_ecc_uncorrected_volatile_errors  uncorrectable ECC errors since the driver loaded (a gauge:
                                            NVML keeps the count, it resets only on driver reload/reset)
- herd_gpu_xid_errors_total                 critical XID events seen since this process started
- herd_gpu_last_xid                         the code of the latest one (0: none yet)
- herd_gpu_info{name,driver}                1, for the model name and driver version

A reading a board does not support (power on some PCIe cards, ECC on consumer GPUs) is left out for
that device only. On a host without NVML (no driver, no GPU: every CPU host) the collector yields
nothing at all: no error, no series, and it does not try again.

XID events come from an NVML event set registered for `nvmlEventTypeXidCriticalError` on each device;
NVML queues them, and each scrape drains the queue without waiting (timeout 0), so no thread is
needed. Where a device refuses the registration (NVML_ERROR_NOT_SUPPORTED: some vGPU and MIG
configurations, containers without the driver's event interface), that device has no XID series and
the reason is logged once; the kernel log (`dmesg | grep -i xid`) is then the only source. The counter
starts at 0 for every watched device, so `increase()` catches the first event too.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("herd.gpu")

# Events drained per scrape at most: an event storm must not hold a scrape.
MAX_EVENTS_PER_SCRAPE = 1000


class GpuCollector:
    """A prometheus_client collector; `nvml` is the pynvml module (a stand-in in unit tests)."""

    def __init__(self, nvml=None):
        # pynvml's functions wrap ctypes calls and carry no types; the unit tests' stand-in neither.
        self._nvml: Any = nvml
        self._lock = threading.Lock()          # scrapes render in worker threads
        self._started = False
        self.available = False
        self.reason = "not probed yet"
        self._devices: list[tuple[int, object, str, str]] = []   # (index, handle, uuid, name)
        self._driver = ""
        self._events = None
        self._xid_watched: set[int] = set()
        self._xid_count: dict[int, int] = {}
        self._last_xid: dict[int, int] = {}

    # prometheus_client calls describe() at registration; without it, it would call collect() there
    # (and initialise NVML while the app is being built).
    def describe(self):
        return []

    def _start(self) -> None:
        self._started = True
        nvml = self._nvml
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                self.reason = "nvidia-ml-py is not installed"
                return
            self._nvml = nvml
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as err:   # no driver / no library: a CPU host
            self.reason = f"NVML unavailable: {err}"
            log.debug("GPU telemetry off: %s", self.reason)
            return
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                name = _text(nvml.nvmlDeviceGetName(handle))
            except nvml.NVMLError as err:
                log.warning("GPU %d: not readable (%s); left out of the metrics", index, err)
                continue
            self._devices.append((index, handle, uuid, name))
        try:
            self._driver = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            self._driver = ""
        self._watch_xids()
        self.available = bool(self._devices)
        self.reason = f"{len(self._devices)} device(s)" if self._devices else "NVML reports no device"

    def _watch_xids(self) -> None:
        nvml = self._nvml
        try:
            self._events = nvml.nvmlEventSetCreate()
        except (nvml.NVMLError, AttributeError) as err:
            log.warning("GPU XID events not watched: no NVML event set (%s)", err)
            return
        for index, handle, _, _ in self._devices:
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._events)
            except nvml.NVMLError as err:
                log.warning("GPU %d: XID events not watched (%s); see the kernel log instead", index, err)
                continue
            self._xid_watched.add(index)
            self._xid_count[index] = 0
            self._last_xid[index] = 0

    def _drain_xids(self) -> None:
        nvml = self._nvml
        if self._events is None or not self._xid_watched:
            return
        for _ in range(MAX_EVENTS_PER_SCRAPE):
            try:
                event = nvml.nvmlEventSetWait(self._events, 0)
            except nvml.NVMLError as err:
                if getattr(err, "value", None) != nvml.NVML_ERROR_TIMEOUT:   # timeout = queue empty
                    log.debug("XID event wait: %s", err)
                return
            if not event.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                index = nvml.nvmlDeviceGetIndex(event.device)
            except nvml.NVMLError:
                continue
            if index in self._xid_watched:
                self._xid_count[index] += 1
                self._last_xid[index] = int(event.eventData)

    def collect(self):
        with self._lock:
            if not self._started:
                self._start()
            if not self.available:
                return []
            return self._families()

    def _families(self) -> list:
        nvml = self._nvml
        labels = ["gpu", "uuid"]
        up = GaugeMetricFamily("herd_gpu_up", "1 when the GPU answered NVML during this scrape.", labels=labels)
        util = GaugeMetricFamily("herd_gpu_utilization_ratio", "Share of the last sample period a kernel "
                                 "was running on the GPU (NVML utilization.gpu / 100).", labels=labels)
        used = GaugeMetricFamily("herd_gpu_memory_used_bytes", "GPU memory in use (all processes).",
                                 labels=labels)
        total = GaugeMetricFamily("herd_gpu_memory_total_bytes", "GPU memory installed.", labels=labels)
        temp = GaugeMetricFamily("herd_gpu_temperature_celsius", "GPU core temperature.", labels=labels)
        power = GaugeMetricFamily("herd_gpu_power_watts", "GPU board power draw.", labels=labels)
        ecc = GaugeMetricFamily("herd_gpu_ecc_uncorrected_volatile_errors", "Uncorrectable ECC memory "
                                "errors since the driver loaded (NVML volatile count).", labels=labels)
        xid = CounterMetricFamily("herd_gpu_xid_errors", "Critical XID events reported by the driver since "
                                  "this process started.", labels=labels)
        last = GaugeMetricFamily("herd_gpu_last_xid", "Code of the latest critical XID event (0: none).",
                                 labels=labels)
        info = GaugeMetricFamily("herd_gpu_info", "GPU model and driver version.",
                                 labels=[*labels, "name", "driver"])
        self._drain_xids()
        for index, handle, uuid, name in self._devices:
            key = [str(index), uuid]

            def read(call, *args):
                try:
                    return call(handle, *args)
                except nvml.NVMLError:
                    return None
            rates = read(nvml.nvmlDeviceGetUtilizationRates)
            memory = read(nvml.nvmlDeviceGetMemoryInfo)
            up.add_metric(key, 1 if rates is not None or memory is not None else 0)
            info.add_metric([*key, name, self._driver], 1)
            if rates is not None:
                util.add_metric(key, rates.gpu / 100)
            if memory is not None:
                used.add_metric(key, memory.used)
                total.add_metric(key, memory.total)
            celsius = read(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
            if celsius is not None:
                temp.add_metric(key, celsius)
            milliwatts = read(nvml.nvmlDeviceGetPowerUsage)
            if milliwatts is not None:
                power.add_metric(key, milliwatts / 1000)
            errors = read(nvml.nvmlDeviceGetTotalEccErrors, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                          nvml.NVML_VOLATILE_ECC)
            if errors is not None:
                ecc.add_metric(key, errors)
            if index in self._xid_watched:
                xid.add_metric(key, self._xid_count[index])
                last.add_metric(key, self._last_xid[index])
        # Families with no sample at all are left out (a board without ECC shows no ECC family).
        return [f for f in (up, util, used, total, temp, power, ecc, xid, last, info) if f.samples]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_process_collector: GpuCollector | None = None
_process_lock = threading.Lock()


def process_collector() -> GpuCollector:
    """One collector per process: NVML state and the XID event queue are per process, and every
    registry (one per app) reads the same counts."""
    global _process_collector
    with _process_lock:
        if _process_collector is None:
            _process_collector = GpuCollector()
        return _process_collector
