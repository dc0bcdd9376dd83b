"""Benchmarks of the provider against its emulator on 127.0.0.1: ``python -m benchmarks`` (or
``make bench``) runs every scenario and writes ``benchmarks/RESULTS.md``.

Modules:

- :mod:`benchmarks.__main__`: the entry point and the order of the scenarios.
- :mod:`benchmarks.common`: the emulator in its own process, machine facts, statistics.
- :mod:`benchmarks.feeder`: a separate process that creates predictions (the workers' part).
- :mod:`benchmarks.pollers`: one process running N pollers in one asyncio loop (the real trigger,
  or a baseline client), the way the triggerer runs triggers.
- :mod:`benchmarks.scale`, :mod:`benchmarks.policy`, :mod:`benchmarks.slots`,
  :mod:`benchmarks.parse`: the four scenarios.
- :mod:`benchmarks.report`: the Markdown report.
"""
