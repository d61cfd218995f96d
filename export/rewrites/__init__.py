"""Rewrites the exporters choose per backend (attention forms, norms, GEGLU split, Winograd): leaves that import no backend."""
