#!/usr/bin/env node
// A Node service submitting chats to chatq through Redis (no HTTP), one JSON line per event.
//
//   node producer.mjs --redis redis://localhost:6379/0 --model tiny \
//       --chat "Where is my order? 🚚" --chat "你好" --stream --idempotency-key order-1
//
// Every --chat goes in one ENQUEUE call (each admitted or refused on its own). Printed:
//   {"event":"queued","n":0,"id":"...","existing":false}         (existing: idempotency hit)
//   {"event":"queue_full","n":1,"queued_tokens":..,"cost_tokens":..,"retry_after_s":..}
//   {"event":"chunk","n":0,"index":0,"delta":"..."}                (with --stream)
//   {"event":"done","n":0,"id":"...","text":"...","finish_reason":"length","usage":{..}}
//   {"event":"error","n":0,"id":"...","code":"...","message":"..."}
// Exit status 0 when every queued chat got a final result.

import { parseArgs } from "node:util";

import Redis from "ioredis";

import { buildEnvelope, Producer, QueueFull, Refused, RequestFailed } from "./chatq.mjs";

const { values } = parseArgs({
  options: {
    redis: { type: "string", default: "redis://localhost:6379/0" },
    prefix: { type: "string", default: "chatq" },
    partitions: { type: "string", default: "1" },
    model: { type: "string" },
    chat: { type: "string", multiple: true, default: [] },
    system: { type: "string" },
    "max-tokens": { type: "string", default: "16" },
    temperature: { type: "string", default: "0" },
    stream: { type: "boolean", default: false },
    "idempotency-key": { type: "string" },
    "max-backlog-tokens": { type: "string", default: "2000000" },
    "timeout-s": { type: "string", default: "60" },
  },
});

function say(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

async function main() {
  if (!values.model || values.chat.length === 0) {
    throw new Error("--model and at least one --chat are required");
  }
  const redis = new Redis(values.redis);
  const partitions = Number(values.partitions);
  const producer = new Producer(redis, {
    prefix: values.prefix,
    partitions,
    maxBacklogTokens: Number(values["max-backlog-tokens"]),
  });
  try {
    const envelopes = values.chat.map((content, n) =>
      buildEnvelope({
        model: values.model,
        messages: [
          ...(values.system ? [{ role: "system", content: values.system }] : []),
          { role: "user", content },
        ],
        params: {
          max_tokens: Number(values["max-tokens"]),
          temperature: Number(values.temperature),
        },
        stream: values.stream,
        partitions,
        // One key per chat: a retry of the same command finds the requests it queued.
        idempotencyKey:
          values["idempotency-key"] === undefined ? undefined : `${values["idempotency-key"]}-${n}`,
      }),
    );
    const outcomes = await producer.submit(envelopes);
    const queued = [];
    outcomes.forEach((outcome, n) => {
      if (outcome instanceof QueueFull) {
        say({
          event: "queue_full",
          n,
          queued_tokens: outcome.queuedTokens,
          cost_tokens: outcome.costTokens,
          retry_after_s: outcome.retryAfterS,
        });
      } else if (outcome instanceof Refused) {
        say({ event: "refused", n, code: outcome.code });
      } else {
        say({ event: "queued", n, ...outcome });
        queued.push([n, outcome.id]);
      }
    });
    let failed = 0;
    for (const [n, id] of queued) {
      try {
        for await (const entry of producer.results(id, { timeoutS: Number(values["timeout-s"]) })) {
          if (entry.type === "chunk") {
            say({ event: "chunk", n, index: entry.index, delta: entry.delta });
          } else {
            say({ event: "done", n, id, ...entry });
          }
        }
      } catch (err) {
        if (!(err instanceof RequestFailed)) throw err;
        failed += 1;
        say({ event: "error", n, id, code: err.code, message: err.message });
      }
    }
    return failed === 0 ? 0 : 1;
  } finally {
    redis.disconnect();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`producer: ${err.stack ?? err}\n`);
    process.exit(2);
  },
);
