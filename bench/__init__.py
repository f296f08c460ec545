"""weightavg's benchmark suite, run by hand: `python -m bench` (see docs/perf.md). Never run by pytest."""
