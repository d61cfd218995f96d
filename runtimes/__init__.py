"""pocketdiff.runtimes: adapters that run exported artifacts in their real runtimes, the validation harness and the latency profiler (mapped here by pyproject.toml)."""
