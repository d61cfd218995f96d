"""pocketdiff.compress: mapped here by pyproject.toml; no modules yet (see the open issues)."""
