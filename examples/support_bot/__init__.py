"""The support bot of the demo shop: a web chat page that streams answers from the chatq
gateway, looks orders up and starts returns in a SQLite database through tool calls, and
hands the conversation to a person when the model calls ``escalate``.

Run it on its own (a private Redis, a worker on the embedded SmolLM2, a gateway, the bot)::

    python -m examples.support_bot

or against a running gateway: ``python -m examples.support_bot --gateway URL --api-key KEY``.
"""
