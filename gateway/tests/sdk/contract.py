"""The gateway's retry contract, as the official Python SDK lives it.

Run by gateway/tests/sdk_contract.rs: argv[1] is the gateway's base URL,
argv[2] a scenario; prints one JSON line with the outcome. The client keeps
its own retries at their default (2), as users run it.
"""

import json
import sys
import time

import anthropic

BASE, SCENARIO = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=BASE, api_key="sk-ant-contract")
MSG = [{"role": "user", "content": "Say hello."}]


def outcome(fn):
    start = time.monotonic()
    try:
        result = {"ok": True, **fn()}
    except anthropic.APIStatusError as e:
        result = {"ok": False, "status": e.status_code, "error": type(e).__name__,
                  "message": str(e)[:400],
                  "should_retry": e.response.headers.get("x-should-retry")}
    except Exception as e:  # a stream's error event, a connection error
        result = {"ok": False, "status": None, "error": type(e).__name__, "message": str(e)[:400]}
    result["secs"] = time.monotonic() - start
    return result


def create(model, content="Say hello."):
    raw = client.messages.with_raw_response.create(
        model=model, max_tokens=16, messages=[{"role": "user", "content": content}])
    message = raw.parse()
    return {"text": message.content[0].text, "model": message.model,
            "served": raw.headers.get("x-served-by-model")}


def stream(model):
    with client.messages.stream(model=model, max_tokens=16, messages=MSG) as events:
        return {"text": "".join(events.text_stream)}


SCENARIOS = {
    "storm": lambda: create("claude-opus-4-6"),
    "final_failure": lambda: create("claude-opus-4-6"),
    "fallback": lambda: create("claude-opus-4-6"),
    "first_event_overload": lambda: stream("claude-sonnet-4-6"),
    "mid_stream_error": lambda: stream("claude-sonnet-4-6"),
    "huge_body": lambda: create("claude-opus-4-6", "x" * (33 * 1024 * 1024)),
}

print(json.dumps(outcome(SCENARIOS[SCENARIO])), flush=True)
