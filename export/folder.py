"""What a format's folder carries for an app that takes it as it is: a machine-readable manifest and a README.

Format-neutral: a backend passes its own artifacts, runtime versions, the latent convention of its decoder
graph and how to load its files; the manifest then says everything a plain runtime script needs to
reproduce `pocketdiff generate` from the folder alone (graph I/O, tokenizer, scheduler and its config,
sampling settings, guidance convention, latent scaling, resolutions, versions), and the README says it
in words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..bundle import Bundle
from ..fileio import atomic_write_bytes, atomic_write_json
from ..guidance import takes_guidance
from ..sampler import SampleConfig
from .base import Artifact, ArtifactSet
from .components import resolution_multiple

FOLDER_MANIFEST = "manifest.json"
README = "README.md"
MANIFEST_VERSION = 1
CFG = {"convention": "classifier-free",
       "formula": "noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)",
       "batch_order": ["uncond (negative prompt, default empty)", "cond"],
       "applies": "when guidance_scale > 1; otherwise one U-Net call per step on the prompt alone"}
EMBEDDED = {"convention": "embedded",
            "formula": "no guidance pass: a guidance-conditioned U-Net; its exported graph takes no timestep_cond "
                       "input, so the guidance embedding is left out",
            "applies": "always"}


def sampling_settings(bundle: Bundle) -> tuple[SampleConfig, str]:
    """The settings `pocketdiff generate` uses for this model, and where they come from."""
    source = ("the model's own sampling settings (pocketdiff.json), which its training validated"
              if bundle.manifest.sampling else "pocketdiff generate's defaults")
    return SampleConfig.for_bundle(bundle), source


def folder_manifest(bundle: Bundle, aset: ArtifactSet, target: str, folder: str, scheduler: Any,
                    tokenizer: dict[str, Any] | None, decoder_divisor: float, runtime: dict[str, str]) -> dict[str, Any]:
    """The manifest of one target's folder (`folder`, relative to the export root); graph paths relative to it.

    `decoder_divisor`: the decoder graph takes final latents divided by this.
    """
    import pocketdiff

    config, source = sampling_settings(bundle)
    artifacts = [a for a in aset.artifacts if a.target == target]
    exported = _sides(artifacts, bundle.vae_scale_factor)
    return {
        "manifest_version": MANIFEST_VERSION, "format": target, "model_hash": aset.model_hash,
        "model": Path(aset.model).name if Path(aset.model).is_absolute() else aset.model,  # no build-machine path
        "versions": {"pocketdiff": pocketdiff.__version__, **runtime},
        "graphs": {a.component: _graph(a, folder) for a in artifacts},
        "tokenizer": tokenizer,
        "scheduler": {"type": type(scheduler).__name__, "name": config.scheduler, "folder": "scheduler",
                      "config": json.loads(json.dumps(dict(scheduler.config), default=str)),
                      "init_noise_sigma": float(scheduler.init_noise_sigma)},
        "sampling": {"steps": config.steps, "guidance_scale": config.guidance_scale,
                     "negative_prompt": config.negative_prompt, "source": source},
        "guidance": EMBEDDED if takes_guidance(bundle.unet) else CFG,
        "latents": {"channels": int(bundle.unet.config.in_channels), "vae_scale_factor": bundle.vae_scale_factor,
                    "scaling_factor": float(bundle.vae.config.scaling_factor), "decoder_divisor": decoder_divisor,
                    "initial_noise": "standard normal [batch, channels, height / vae_scale_factor, width / "
                                     "vae_scale_factor] times the scheduler's init_noise_sigma; pocketdiff draws "
                                     "image i's with torch.randn from torch.Generator().manual_seed(seed + i)"},
        "image": "decoder output x in [-1, 1]: pixels = round(clip(x / 2 + 0.5, 0, 1) * 255), NCHW to HWC",
        "resolutions": {"native": bundle.resolution, "exported": exported or [bundle.resolution],
                        "multiple": resolution_multiple(bundle)},
        "quantization": aset.quantization,
    }


def _sides(artifacts: list[Artifact], vae_scale_factor: int) -> list[int]:
    """The image sides (pixels) the U-Net and decoder graphs were exported for, from their latent shapes."""
    keys = {"unet": "sample", "vae_decoder": "latent_sample"}
    return sorted({s[keys[a.component]][2] * vae_scale_factor for a in artifacts if a.component in keys
                   for s in a.shapes if keys[a.component] in s})


def _graph(artifact: Artifact, folder: str) -> dict[str, Any]:
    path = Path(artifact.path)
    return {"path": str(path.relative_to(folder)) if path.is_relative_to(folder) else artifact.path,
            "precision": artifact.precision, "attention_form": artifact.details.get("attention_form"), "inputs": artifact.inputs, "outputs": artifact.outputs,
            "exported_shapes": artifact.shapes, "interface": artifact.details.get("interface", {})}


def render_readme(manifest: dict[str, Any], loading: str) -> str:
    """The folder's README.md, from its manifest plus the format's `loading` section (markdown)."""
    lat, samp, sched, guide = manifest["latents"], manifest["sampling"], manifest["scheduler"], manifest["guidance"]
    rows = "\n".join(f"| {name} | `{g['path']}` | {_io(g['inputs'])} | {_io(g['outputs'])} |"
                     for name, g in manifest["graphs"].items())
    tok = manifest["tokenizer"]
    tok_line = (f"`tokenizer/` ({tok['kind']}, class `{tok['class']}`; files {', '.join(tok['files'])}): pad or "
                f"truncate to {tok['max_length']} tokens with `{tok['pad_token']}` (id {tok['pad_id']})."
                if tok else "no tokenizer: this model has no text encoder.")
    return f"""# {manifest['model']} ({manifest['format']})

Written by pocketdiff {manifest['versions']['pocketdiff']}. Everything needed to generate images lies in this
folder; `{FOLDER_MANIFEST}` says it for programs (the same facts as below).

## Graphs
| component | file | inputs | outputs |
|---|---|---|---|
{rows}

## Generating an image
1. Tokenizer: {tok_line}
2. Text states: run the text encoder on the prompt (and, with guidance, on the negative prompt).
3. Noise: {lat['initial_noise']}.
4. Scheduler: `{sched['type']}` (`scheduler/scheduler_config.json`), {samp['steps']} steps, guidance scale
   {samp['guidance_scale']} ({samp['source']}). Guidance: {guide['convention']}, {guide['formula']}, {guide['applies']}.
5. Each step: U-Net on the (scheduler-scaled) latents, the timestep and the text states; scheduler update.
6. Decode: the decoder takes the final latents divided by {lat['decoder_divisor']:g} (the VAE's own scaling
   factor is {lat['scaling_factor']:g}); {manifest['image']}.

Image sides: multiples of {manifest['resolutions']['multiple']}, native {manifest['resolutions']['native']},
exported for {', '.join(str(s) for s in manifest['resolutions']['exported'])}.

{loading}
"""


def _io(values: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"`{n}` {v['dtype']} {v['shape']}" for n, v in values.items())


def write_folder_docs(folder: Path, manifest: dict[str, Any], readme: str, files: dict[str, bytes]) -> None:
    """Write the manifest, the README and any further files (an example script) into `folder`."""
    atomic_write_json(folder / FOLDER_MANIFEST, manifest)
    atomic_write_bytes(folder / README, readme.encode())
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
