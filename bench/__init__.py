"""tileattn benchmarks: ``python -m bench``."""
