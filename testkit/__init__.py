"""Fixtures that tests/ and bench/ share: tiny random checkpoints with a real tokenizer
(``checkpoints``) and the zero-cost engine of the queue benchmarks (``zero_cost_engine``).

The dependency runs one way: tests/ and bench/ import testkit, testkit imports neither
(``tests/test_layering.py`` checks it). testkit is not part of the installed package.
"""
