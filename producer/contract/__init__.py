"""The Redis contract producers and workers speak (``docs/protocol.md`` describes it).

One noun per module; ``producer/`` and ``workers/`` both import these, and nothing here
imports either side:

- :mod:`~producer.contract.keys`: every key name and TTL, stream field names
- :mod:`~producer.contract.envelope`: the request envelope's types
- :mod:`~producer.contract.options`: :class:`SubmitOptions`, the options of a submit
- :mod:`~producer.contract.validation` / :mod:`~producer.contract.fast_path`: its checks
- :mod:`~producer.contract.codec`: build, encode and decode envelopes
- :mod:`~producer.contract.limits` and :mod:`~producer.contract.codes`: bounds, error codes
- :mod:`~producer.contract.results`: result-stream entries
- :mod:`~producer.contract.scripts` (sources in ``lua/``): every Lua script
- :mod:`~producer.contract.enqueue` / :mod:`~producer.contract.finalize`: the layout of
  the ENQUEUE and FINALIZE calls and their replies
- :mod:`~producer.contract.cancel`: the writes of a cancel
- :mod:`~producer.contract.schema`: the JSON Schemas in ``docs/schema/``
"""
