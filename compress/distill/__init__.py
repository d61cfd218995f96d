"""Step distillation: students that sample in 1–8 steps, trained from a teacher on the shared loop.

Registered passes: `lcm` (latent consistency, optionally LoRA), `fold-guidance` (bakes an embedded
guidance into a plain U-Net), `guided-distill` and `progressive` (guided two-stage progressive
distillation, one stage per halving round) and `cfg-aware` (SnapFusion's CFG-aware step
distillation). `schedule`, `student`, `data`, `checks` and `speed` are what they share.
"""
