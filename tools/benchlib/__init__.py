"""The pieces of ``tools/bench.py``: servers, load workers, scenarios, report."""
