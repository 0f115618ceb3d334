// The official openai npm package against a chatq gateway: one completion, one stream.
// Usage: node chat.mjs BASE_URL API_KEY MODEL  → prints one JSON line with what it got.
import OpenAI from "openai";

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey });
const messages = [{ role: "user", content: "Where is my order?" }];

const completion = await client.chat.completions.create({
  model, messages, max_tokens: 8, temperature: 0,
});
const stream = await client.chat.completions.create({
  model, messages, max_tokens: 8, temperature: 0, stream: true,
  stream_options: { include_usage: true },
});
let streamed = "";
let usage = null;
for await (const chunk of stream) {
  if (chunk.choices.length > 0) streamed += chunk.choices[0].delta.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
let notFound = null;
try {
  await client.chat.completions.create({ model: "nobody-serves-this", messages });
} catch (err) {
  notFound = { isNotFound: err instanceof OpenAI.NotFoundError, status: err.status };
}
console.log(JSON.stringify({
  text: completion.choices[0].message.content,
  finish_reason: completion.choices[0].finish_reason,
  usage: completion.usage,
  streamed,
  stream_usage: usage,
  not_found: notFound,
}));
