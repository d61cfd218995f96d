"""pocketdiff: Stable-Diffusion-family text-to-image models made small, fast and validated on phones."""

__version__ = "0.1.0"
