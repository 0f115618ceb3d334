"""chatq's HTTP gateway: the OpenAI Chat Completions API, a job API, API keys with
per-tenant limits, and signed webhooks, in front of the same Redis queue."""
