"""A chaos harness shared by ``tests/chaos/`` and ``bench/chaos.py``: real Redis and worker
processes (``cluster``), a TCP proxy between workers and Redis for network faults
(``proxy``), traffic that submits, streams and cancels (``traffic``), a schedule of faults
(``nemesis``) and an independent checker of what every request got (``checker``).
"""
