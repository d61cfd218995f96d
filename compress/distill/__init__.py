"""Step distillation: students that sample in 1–8 steps, trained from a teacher on the shared loop.

`lcm` (latent consistency, optionally LoRA), `progressive` (guided two-stage progressive
distillation), `cfg-aware` (SnapFusion's CFG-aware step distillation) and `fold-guidance` are
registered passes; `schedule`, `student`, `data` and `checks` are what they share.
"""
