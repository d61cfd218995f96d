"""pocketdiff.export: one module per backend (onnx, coreml, executorch) over `base`, with the graph rewrites as leaves in `rewrites/` (mapped here by pyproject.toml)."""
