"""pocketdiff.compress: training passes that make a model cheaper to run (mapped here by pyproject.toml)."""
