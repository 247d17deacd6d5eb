// The gateway's retry contract, as the official TypeScript SDK lives it.
//
// Run by gateway/tests/sdk_contract.rs with node (NODE_PATH names the
// node_modules holding @anthropic-ai/sdk): argv[2] is the gateway's base
// URL, argv[3] a scenario; prints one JSON line with the outcome. The
// client keeps its own retries at their default (2), as users run it.
'use strict';

const Anthropic = require('@anthropic-ai/sdk').default;

const [base, scenario] = process.argv.slice(2);
const client = new Anthropic({ baseURL: base, apiKey: 'sk-ant-contract' });
const MSG = [{ role: 'user', content: 'Say hello.' }];

async function outcome(fn) {
  const start = Date.now();
  let result;
  try {
    result = { ok: true, ...(await fn()) };
  } catch (e) {
    result = {
      ok: false,
      status: typeof e.status === 'number' ? e.status : null,
      error: e.constructor.name,
      message: String(e.message).slice(0, 400),
      should_retry: e.headers && typeof e.headers.get === 'function'
        ? e.headers.get('x-should-retry')
        : (e.headers ? e.headers['x-should-retry'] ?? null : null),
    };
  }
  result.secs = (Date.now() - start) / 1000;
  return result;
}

async function create(model, content = 'Say hello.') {
  const { data, response } = await client.messages
    .create({ model, max_tokens: 16, messages: [{ role: 'user', content }] })
    .withResponse();
  return {
    text: data.content[0].text,
    model: data.model,
    served: response.headers.get('x-served-by-model'),
  };
}

async function stream(model) {
  const events = client.messages.stream({ model, max_tokens: 16, messages: MSG });
  let text = '';
  for await (const event of events) {
    if (event.type === 'content_block_delta' && event.delta.type === 'text_delta') {
      text += event.delta.text;
    }
  }
  return { text };
}

const scenarios = {
  storm: () => create('claude-opus-4-6'),
  final_failure: () => create('claude-opus-4-6'),
  fallback: () => create('claude-opus-4-6'),
  first_event_overload: () => stream('claude-sonnet-4-6'),
  mid_stream_error: () => stream('claude-sonnet-4-6'),
  huge_body: () => create('claude-opus-4-6', 'x'.repeat(33 * 1024 * 1024)),
};

outcome(scenarios[scenario]).then((result) => {
  console.log(JSON.stringify(result));
});
