"""The pieces of the relay, in process: an engine exposition merged into herd's, and herd's request
histograms filled from server-sent events however the network cuts them."""
import json
import time

from prometheus_client.parser import text_string_to_metric_families

from runtime.serving.metrics import EngineScrape, Metrics, RelayedGeneration

ENGINE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.2e+09
# HELP herd_queue_depth not herd's
# TYPE herd_queue_depth gauge
herd_queue_depth 99.0
"""


def parsed(text: str) -> dict:
    return {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}


def sample_value(text: str, name: str) -> float:
    return parsed(text)[name].value


def test_engine_families_follow_herds_and_never_shadow_them():
    m = Metrics(gpu=False)
    text = m.render(queue_depth=1, ready=True, engine=EngineScrape(ENGINE, 0.01))
    samples = parsed(text)
    assert samples["vllm:num_requests_running"].value == 3 and samples["vllm:num_requests_running"].labels["model_name"] == "m"
    assert samples["herd_queue_depth"].value == 1                   # herd's, not the engine's 99
    assert text.count("# TYPE herd_queue_depth ") == 1
    assert "process_resident_memory_bytes" not in samples            # the engine's process, not herd's
    assert samples["herd_engine_metrics_up"].value == 1


def test_a_garbled_or_missing_engine_exposition_leaves_herds_metrics_whole():
    m = Metrics(gpu=False)
    garbled = m.render(queue_depth=0, ready=True, engine=EngineScrape("vllm:x{ 1 2 3\n", 0.01))
    assert sample_value(garbled, "herd_engine_metrics_up") == 0 and "vllm:" not in garbled
    missing = m.render(queue_depth=0, ready=False, engine=EngineScrape(None, 2.0, "timed out after 2s"))
    assert sample_value(missing, "herd_engine_metrics_up") == 0
    assert sample_value(missing, "herd_engine_metrics_fetch_seconds") == 2.0
    assert sample_value(missing, "herd_ready") == 0
    # herd's own engine: no engine gauges at all.
    assert "herd_engine_metrics_up" not in Metrics(gpu=False).render(queue_depth=0, ready=True)


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def test_sse_split_anywhere_counts_each_token_once():
    m = Metrics(gpu=False)
    started = time.monotonic()
    meter = RelayedGeneration(m, started)
    stream = (sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})   # not a token
              + b"".join(sse({"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}) for i in range(5))
              + sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
              + sse({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5}})
              + b"data: [DONE]\n\n")
    for i in range(0, len(stream), 7):         # 7-byte reads: lines and JSON cut mid-way
        meter.feed(stream[i:i + 7])
    meter.close()
    meter.close()                              # idempotent: a closed stream is counted once
    text = m.render(queue_depth=0, ready=True)
    assert sample_value(text, "herd_time_to_first_token_seconds_count") == 1
    assert sample_value(text, "herd_time_per_output_token_seconds_count") == 4
    assert sample_value(text, "herd_request_latency_seconds_count") == 1
    assert sample_value(text, "herd_generated_tokens_total") == 5
    assert sample_value(text, "herd_prompt_tokens_total") == 11


def test_non_streaming_answers_count_their_usage():
    m = Metrics(gpu=False)
    meter = RelayedGeneration(m, time.monotonic())
    meter.body(json.dumps({"choices": [{"text": "abc"}], "usage": {"prompt_tokens": 4, "completion_tokens": 9}}).encode())
    meter.close()
    text = m.render(queue_depth=0, ready=True)
    assert sample_value(text, "herd_generated_tokens_total") == 9
    assert sample_value(text, "herd_prompt_tokens_total") == 4
    assert sample_value(text, "herd_time_to_first_token_seconds_count") == 0   # not observable from outside
    assert sample_value(text, "herd_request_latency_seconds_count") == 1
