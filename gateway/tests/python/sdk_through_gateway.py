"""The official anthropic SDK through the gateway, with its own retries off.

Run by tests/sdk.rs with the gateway's base URL as the only argument; prints
"sdk ok" when a plain call (which meets a scripted 529 storm upstream) and a
streaming call both come back whole.
"""

import sys

import anthropic

base_url = sys.argv[1]
client = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-sdk-secret", max_retries=0)

message = client.messages.create(
    model="claude-opus-4-6",
    max_tokens=32,
    messages=[{"role": "user", "content": "Say hello."}],
)
assert message.content[0].text == "Hello from the mock.", message

with client.messages.stream(
    model="claude-sonnet-4-6",
    max_tokens=32,
    messages=[{"role": "user", "content": "Say hello."}],
) as stream:
    text = "".join(stream.text_stream)
assert text == "Hello world", repr(text)

print("sdk ok")
