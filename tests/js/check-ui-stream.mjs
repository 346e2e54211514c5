// Reads SSE bodies of chatlog's `format=ui` stream and replays each through the
// real AI SDK, the way its DefaultChatTransport and readUIMessageStream do.
//
// stdin:  one request per line: {"bodies": ["id: 2:0\ndata: {...}\n\n...", ...]}
// stdout: one answer per line: {"sdks": {"<version>": [{"problems", "errors", "chunks", "messages"}, ...]}}
// (A long-lived process answers many requests: node and the SDK take most of a
// second to start, a body takes about a millisecond.)
//   problems: everything a client would choke on (a chunk the SDK's schema rejects,
//             a field the schema does not declare, a reader failure); [] when fine
//   errors:   errorText of each `error` chunk, in order (the reader reports them)
//   chunks:   how many chunks were parsed
//   messages: the final UIMessage of each messageId, in order of first appearance
//
// Every installed SDK major is checked (`ai` = 6.x, `ai5` = 5.x). Exits 2 when
// the SDK or the strictness probe does not work as this script assumes.

import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import * as ai6 from 'ai';
import * as ai5 from 'ai5';

const SDKS = [
  { version: JSON.parse(readFileSync(new URL('./node_modules/ai/package.json', import.meta.url))).version, sdk: ai6 },
  { version: JSON.parse(readFileSync(new URL('./node_modules/ai5/package.json', import.meta.url))).version, sdk: ai5 },
];
const PROBE = '__chatlog_probe__';

// The SDK's chunk schemas are zod loose objects: undeclared keys pass. Older 5.x
// releases used strict objects, so a key the schema does not declare is a bug
// for us. Zod returns declared keys first (in declaration order) and unknown
// keys after them in input order, so a probe key put first in the input lands
// after the declared keys and before the unknown ones.
async function undeclaredKeys(schema, chunk) {
  const result = await schema.validate({ [PROBE]: true, ...chunk });
  const keys = Object.keys(result.value);
  return keys.slice(keys.indexOf(PROBE) + 1);
}

async function selfTest(schema, version) {
  const got = await undeclaredKeys(schema, { type: 'text-delta', id: 'a', delta: 'b', bogus: 1 });
  if (JSON.stringify(got) !== '["bogus"]') {
    console.error(`ai ${version}: the undeclared-key probe no longer works (got ${JSON.stringify(got)})`);
    process.exit(2);
  }
}

function byteStream(text) {
  // Cut at odd places, as a network would: the SDK's SSE parser must reassemble.
  const bytes = new TextEncoder().encode(text);
  return new ReadableStream({
    start(controller) {
      for (let i = 0; i < bytes.length; i += 61) controller.enqueue(bytes.slice(i, i + 61));
      controller.close();
    },
  });
}

async function check({ sdk }, schema, body) {
  const problems = [];
  const errors = [];
  const errorTexts = []; // `error` chunks the reader will report through onError
  let chunks = 0;
  const parsed = sdk.parseJsonEventStream({ stream: byteStream(body), schema: sdk.uiMessageChunkSchema });
  const checked = parsed.pipeThrough(new TransformStream({
    async transform(result, controller) {
      chunks += 1;
      if (!result.success) {
        // DefaultChatTransport throws here, ending the response: so do we.
        problems.push(`chunk ${chunks} rejected by the SDK schema: ${result.error.message}`);
        controller.error(result.error);
        return;
      }
      const extra = await undeclaredKeys(schema, result.value);
      if (extra.length) problems.push(`chunk ${chunks} (${result.value.type}) has undeclared fields ${extra.join(', ')}`);
      if (result.value.type === 'error') errorTexts.push(result.value.errorText);
      controller.enqueue(result.value);
    },
  }));
  const latest = new Map();
  const onError = (error) => {
    if (error.constructor === Error && errorTexts.length && error.message === errorTexts[0]) {
      errors.push(errorTexts.shift());
    } else {
      problems.push(`reader failed: ${error.name}: ${error.message}`);
    }
  };
  for await (const message of sdk.readUIMessageStream({ stream: checked, onError })) {
    latest.set(message.id, message);
  }
  return { problems, errors, chunks, messages: [...latest.values()] };
}

const schemas = SDKS.map((entry) => entry.sdk.uiMessageChunkSchema());
for (const [i, entry] of SDKS.entries()) await selfTest(schemas[i], entry.version);
for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  if (!line.trim()) continue;
  const { bodies } = JSON.parse(line);
  const out = { sdks: {} };
  for (const [i, entry] of SDKS.entries()) {
    const results = [];
    for (const body of bodies) results.push(await check(entry, schemas[i], body));
    out.sdks[entry.version] = results;
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}
