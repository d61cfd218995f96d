"""Slimming: smaller U-Nets and VAE decoders that start from the teacher, recovered by distillation.

Registered passes: `remove-blocks` (BK-SDM block removal), `light-decoder` (a TAESD-style
Conv/ReLU/Upsample decoder fitted to the teacher's), `recover` (output- and feature-level
distillation plus the denoising loss, after any slimming pass), `prune` (Taylor-importance structured
channel and head pruning per stage through torch-pruning's dependency graph).
"""
