// Drives chatlog's /v1/ai-sdk/chat with the real AI SDK, as a browser's useChat would.
//
// stdin: one JSON command; stdout: one JSON answer. The command's `sdk` picks the
// package: "ai" (6.x, default) or "ai5" (5.x). Every request the transport makes
// is reported in `requests` ({method, url, status, body}) so a test can replay one.
//
//   {"op": "send", "api", "headers", "chatId", "messages", "trigger"?, "messageId"?, "body"?}
//       DefaultChatTransport.sendMessages, read with readUIMessageStream; the last
//       message is continued when it is the assistant's (as useChat does after
//       addToolOutput) -> {"message", "chunks": [types], "errors"} or {"thrown"}
//   {"op": "reconnect", "api", "headers", "chatId"}
//       DefaultChatTransport.reconnectToStream -> {"stream": null} (204) or
//       {"message", "chunks", "errors"}
//   {"op": "chat", "api", "headers", "chatId", "text", "body"?, "toolOutputs"?: {toolName: output},
//    "toolErrors"?: {toolName: errorText}}
//       the SDK's own Chat (what useChat wraps): sendMessage({text}); onToolCall answers
//       with addToolOutput; sendAutomaticallyWhen = lastAssistantMessageIsCompleteWithToolCalls
//       -> {"messages", "status", "error", "finishes": [onFinish's finishReason, ...]}

import * as ai6 from 'ai';
import * as ai5 from 'ai5';

const SDKS = { ai: ai6, ai5 };
const DEADLINE_MS = 60_000;

function recordingFetch(requests) {
  return async (url, init = {}) => {
    const response = await fetch(url, init);
    requests.push({
      method: init.method ?? 'GET', url: String(url), status: response.status,
      body: typeof init.body === 'string' ? JSON.parse(init.body) : null,
      conversationId: response.headers.get('x-chatlog-conversation-id'),
      turnId: response.headers.get('x-chatlog-turn-id'),
    });
    return response;
  };
}

function transportOf(sdk, command, requests) {
  return new sdk.DefaultChatTransport({
    api: command.api, headers: command.headers ?? {}, body: command.body, fetch: recordingFetch(requests),
  });
}

async function read(sdk, stream, message) {
  const chunks = [];
  const errors = [];
  const counted = stream.pipeThrough(new TransformStream({
    transform(chunk, controller) { chunks.push(chunk.type); controller.enqueue(chunk); },
  }));
  let last = message;
  for await (const m of sdk.readUIMessageStream({ stream: counted, message, onError: (e) => errors.push(String(e?.message ?? e)) })) {
    last = m;
  }
  return { message: last ?? null, chunks, errors };
}

async function send(sdk, command, requests) {
  const transport = transportOf(sdk, command, requests);
  const messages = command.messages;
  const lastMessage = messages[messages.length - 1];
  let stream;
  try {
    stream = await transport.sendMessages({
      chatId: command.chatId, messages, trigger: command.trigger ?? 'submit-message',
      messageId: command.messageId, abortSignal: undefined,
    });
  } catch (error) {
    return { thrown: String(error?.message ?? error) };
  }
  // useChat continues the last message when it is the assistant's
  const continued = lastMessage?.role === 'assistant' ? structuredClone(lastMessage) : undefined;
  return read(sdk, stream, continued);
}

async function reconnect(sdk, command, requests) {
  const stream = await transportOf(sdk, command, requests).reconnectToStream({ chatId: command.chatId });
  if (stream == null) return { stream: null };
  return read(sdk, stream, undefined);
}

class State {
  constructor() { this.status = 'ready'; this.error = undefined; this.messages = []; }
  pushMessage = (m) => { this.messages = this.messages.concat(m); };
  popMessage = () => { this.messages = this.messages.slice(0, -1); };
  replaceMessage = (i, m) => { this.messages = [...this.messages.slice(0, i), m, ...this.messages.slice(i + 1)]; };
  snapshot = (thing) => structuredClone(thing);
}

async function chat(sdk, command, requests) {
  const finishes = [];
  const outputs = command.toolOutputs ?? {};
  const failures = command.toolErrors ?? {};
  let instance;
  instance = new sdk.AbstractChat({
    id: command.chatId,
    transport: transportOf(sdk, command, requests),
    state: new State(),
    sendAutomaticallyWhen: sdk.lastAssistantMessageIsCompleteWithToolCalls,
    onToolCall: ({ toolCall }) => {
      // not awaited, as the SDK's docs say (it would wait for the stream it is called from)
      if (toolCall.toolName in failures) {
        instance.addToolOutput({ tool: toolCall.toolName, toolCallId: toolCall.toolCallId, state: 'output-error',
                                 errorText: failures[toolCall.toolName] });
      } else if (toolCall.toolName in outputs) {
        instance.addToolOutput({ tool: toolCall.toolName, toolCallId: toolCall.toolCallId,
                                 output: outputs[toolCall.toolName] });
      }
    },
    onFinish: ({ finishReason }) => finishes.push(finishReason ?? null),
  });
  await instance.sendMessage({ text: command.text });
  const deadline = Date.now() + DEADLINE_MS;
  while (instance.status === 'submitted' || instance.status === 'streaming') {
    if (Date.now() > deadline) throw new Error(`the chat was still ${instance.status} after ${DEADLINE_MS} ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return { messages: instance.messages, status: instance.status, error: instance.error?.message ?? null, finishes };
}

const OPS = { send, reconnect, chat };

async function main() {
  let input = '';
  for await (const piece of process.stdin) input += piece;
  const command = JSON.parse(input);
  const sdk = SDKS[command.sdk ?? 'ai'];
  const requests = [];
  const answer = await OPS[command.op](sdk, command, requests);
  process.stdout.write(JSON.stringify({ ...answer, requests }) + '\n');
}

main().catch((error) => {
  process.stderr.write(`${error?.stack ?? error}\n`);
  process.exit(1);
});
