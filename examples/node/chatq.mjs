// chatq's Redis contract for Node: build an envelope, ENQUEUE it, read its result stream.
//
// Everything here follows docs/protocol.md: key names, the envelope (msgpack), the ENQUEUE
// script's KEYS / ARGV / reply, and the result entries (t = chunk / done / error, m = msgpack
// body). The producer never computes a backlog cost: ENQUEUE does, from the envelope, so a
// JavaScript string's UTF-16 length never matters.

import { createHash, randomBytes, randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";

import { decode, encode } from "@msgpack/msgpack";

export const PROTOCOL_VERSION = 1;
export const IDEMPOTENCY_TTL_S = 3600;

// The script travels with the contract: producer/contract/lua/enqueue.lua. A service outside
// this repository vendors that file, pinned to the protocol version it speaks.
const ENQUEUE_LUA = readFileSync(
  new URL("../../producer/contract/lua/enqueue.lua", import.meta.url),
  "utf8",
);

/**
 * The partition a string belongs to: the first 32 bits of its SHA-1, modulo the number of
 * partitions (producer/contract/keys.py: partition_of).
 */
export function partitionOf(text, partitions) {
  if (partitions === 1) return 0;
  return parseInt(createHash("sha1").update(text).digest("hex").slice(0, 8), 16) % partitions;
}

/**
 * Every key name under one prefix (docs/protocol.md, "Keys"): `<prefix>:<kind>:{q<p>}...`,
 * the hash tag of partition p (one Redis Cluster slot per partition). A request id's result
 * stream is in the id's partition.
 */
export class Keys {
  constructor(prefix = "chatq", partitions = 1) {
    this.prefix = prefix;
    this.partitions = partitions;
  }
  tag(partition) {
    return `{q${partition}}`;
  }
  requests(model, priority, partition = 0) {
    return `${this.prefix}:req:${this.tag(partition)}:${model}:${priority}`;
  }
  result(requestId) {
    return `${this.prefix}:res:${this.tag(partitionOf(requestId, this.partitions))}:${requestId}`;
  }
  backlog(model, partition = 0) {
    return `${this.prefix}:backlog:${this.tag(partition)}:${model}`;
  }
  models(partition = 0) {
    return `${this.prefix}:models:${this.tag(partition)}`;
  }
  totals(partition = 0) {
    return `${this.prefix}:totals:${this.tag(partition)}`;
  }
}

/**
 * A request id: 1 to 64 of A-Z a-z 0-9 _ . : - (here 32 hex digits), drawn until it lands in
 * `partition` of `partitions`.
 */
export function newRequestId(partition = 0, partitions = 1) {
  for (;;) {
    const id = randomUUID().replaceAll("-", "");
    if (partitionOf(id, partitions) === partition) return id;
  }
}

/**
 * The partition of an idempotency scope (model, tenant, key): a request with an idempotency
 * key needs an id in it, so a retry lands where the first submit did.
 */
export function scopePartition(model, tenant, key, partitions) {
  const t = tenant ?? "";
  const scope = `${Buffer.byteLength(model)}:${model}${Buffer.byteLength(t)}:${t}${key}`;
  const digest = createHash("sha1").update(scope).digest("hex");
  return parseInt(digest.slice(0, 8), 16) % partitions;
}

/**
 * The envelope of one chat (docs/schema/envelope.schema.json). Only the fields given are
 * sent; the worker applies the defaults. `deadlineS` is seconds from now. With several
 * `partitions` the new id is drawn in the idempotency key's partition (a retry lands where
 * the first submit did), else in a random one.
 */
export function buildEnvelope({
  model,
  messages,
  params = {},
  priority = "normal",
  stream = false,
  idempotencyKey,
  deadlineS,
  partitions = 1,
  id = idempotencyKey === undefined || partitions === 1
    ? newRequestId(Math.floor(Math.random() * partitions), partitions)
    : newRequestId(scopePartition(model, undefined, idempotencyKey, partitions), partitions),
}) {
  const now = Date.now();
  const env = {
    v: PROTOCOL_VERSION,
    id,
    model,
    messages,
    params,
    priority,
    created_ms: now,
    stream,
  };
  if (idempotencyKey !== undefined) env.idempotency_key = idempotencyKey;
  if (deadlineS !== undefined) env.deadline_ms = now + Math.round(deadlineS * 1000);
  return env;
}

/** A bound was reached: retry after `retryAfterS` (ENQUEUE's hint, spread by ±10%). */
export class QueueFull extends Error {
  constructor(queuedTokens, costTokens, limitTokens, retryMs) {
    super(`queue full (${queuedTokens} of ${limitTokens} queued)`);
    this.queuedTokens = queuedTokens;
    this.costTokens = costTokens;
    this.retryAfterS = Math.min(Math.max((retryMs / 1000) * (0.9 + 0.2 * Math.random()), 0.05), 60);
  }
}

/** ENQUEUE refused the request: its id is in use (3) or its key names another body (4). */
export class Refused extends Error {
  constructor(status) {
    super(status === 3 ? "id_in_use" : "idempotency_mismatch");
    this.code = this.message;
  }
}

/** A chat that ended with an `error` result. */
export class RequestFailed extends Error {
  constructor(code, message) {
    super(`[${code}] ${message}`);
    this.code = code;
  }
}

export class Producer {
  /** `redis`: an ioredis client; `maxBacklogTokens`: may lower the bound Redis holds. */
  constructor(redis, { prefix = "chatq", partitions = 1, maxBacklogTokens = 0 } = {}) {
    this.redis = redis;
    this.keys = new Keys(prefix, partitions);
    this.maxBacklogTokens = maxBacklogTokens;
    redis.defineCommand("chatqEnqueue", { lua: ENQUEUE_LUA });
  }

  /**
   * Enqueue envelopes in one ENQUEUE call, each admitted as if alone ("each" mode). Returns,
   * per envelope, `{id, existing, cancelToken}`, a QueueFull or a Refused. Only the SHA-1 of
   * each request's cancel token goes to Redis.
   */
  async submit(envelopes) {
    // One ENQUEUE call per partition: a call touches the keys of one partition only.
    const byPartition = new Map();
    envelopes.forEach((env, i) => {
      const p = partitionOf(env.id, this.keys.partitions);
      if (!byPartition.has(p)) byPartition.set(p, []);
      byPartition.get(p).push(i);
    });
    const out = new Array(envelopes.length);
    for (const [partition, indexes] of byPartition) {
      const part = await this.enqueue(partition, indexes.map((i) => envelopes[i]));
      indexes.forEach((i, k) => { out[i] = part[k]; });
    }
    return out;
  }

  async enqueue(partition, envelopes) {
    const models = [];
    const perRequest = [];
    const tokens = [];
    const index = (list, value) => {
      let i = list.indexOf(value);
      if (i < 0) i = list.push(value) - 1;
      return i + 1; // 1-based, as the script counts
    };
    for (const env of envelopes) {
      const token = randomBytes(16).toString("hex");
      tokens.push(token);
      perRequest.push(
        Buffer.from(encode(env)),
        index(models, env.model),
        createHash("sha1").update(token).digest("hex"),
      );
    }
    const keys = [
      this.keys.models(partition),
      this.keys.totals(partition),
      ...models.map((m) => this.keys.backlog(m, partition)),
    ];
    const args = [
      models.length,
      this.maxBacklogTokens,
      IDEMPOTENCY_TTL_S,
      "each",
      this.keys.prefix,
      this.keys.tag(partition),
      partition,
      this.keys.partitions,
      ...models,
      ...perRequest,
    ];
    const reply = await this.redis.chatqEnqueue(keys.length, ...keys, ...args);
    return reply[1].map((outcome, i) => {
      const status = Number(outcome[0]);
      if (status === 1) return { id: envelopes[i].id, existing: false, cancelToken: tokens[i] };
      if (status === 2) return { id: String(outcome[1]), existing: true, cancelToken: "" };
      if (status === 0) {
        const [queued, cost, retryMs, bound] = [1, 3, 4, 5].map((k) => Number(outcome[k]));
        return new QueueFull(queued, cost, bound, retryMs);
      }
      return new Refused(status);
    });
  }

  /**
   * The entries of a request's result stream as they come: `{type: "chunk", index, delta}`
   * then one `{type: "done", ...}` (or a thrown RequestFailed for `error`).
   */
  async *results(requestId, { timeoutS = 60 } = {}) {
    const key = this.keys.result(requestId);
    let lastId = "0-0";
    const deadline = Date.now() + timeoutS * 1000;
    while (Date.now() < deadline) {
      const blockMs = Math.max(1, Math.min(5000, deadline - Date.now()));
      const reply = await this.redis.xreadBuffer(
        "COUNT", 512, "BLOCK", blockMs, "STREAMS", key, lastId,
      );
      if (reply === null) continue;
      for (const [entryId, flat] of reply[0][1]) {
        lastId = entryId.toString();
        const fields = {};
        for (let i = 0; i < flat.length; i += 2) fields[flat[i].toString()] = flat[i + 1];
        const type = fields.t.toString();
        const body = decode(fields.m);
        if (type === "chunk") {
          yield { type, index: body.index, delta: body.delta };
        } else if (type === "done") {
          yield { type, ...body };
          return;
        } else if (type === "error") {
          throw new RequestFailed(body.code, body.message);
        }
      }
    }
    throw new Error(`no final result for ${requestId} within ${timeoutS} s`);
  }
}
