"""Options for the export tests: latency kept short (no timing is asserted)."""

FAST = dict(batch=2, seq=8, iters=3, progress=False)
