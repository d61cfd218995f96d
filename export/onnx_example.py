"""Generate an image from a pocketdiff ONNX folder with numpy, onnxruntime and tokenizers only.

Shipped into every ONNX folder as `generate.py`; it reads everything from the folder's manifest.json:
    python generate.py --prompt "a photo of a sneaker" --seed 0 --out image.png [--noise noise.npy]
pocketdiff draws its starting noise with torch.randn; numpy's generator draws other numbers, so to
reproduce a pocketdiff image exactly, pass that noise as a .npy file of shape [1, C, h, w] (--noise).
Supports the DDIM scheduler (the one pocketdiff exports its models with); others stop with a message.
"""

import argparse
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent


def ddim_alphas(cfg: dict) -> np.ndarray:
    """The cumulative alpha products of the DDIM noise schedule, in float32 as diffusers computes them."""
    unsupported = [k for k in ("thresholding", "rescale_betas_zero_snr") if cfg.get(k)]
    if unsupported or cfg.get("trained_betas") is not None:
        raise SystemExit(f"scheduler option {unsupported or ['trained_betas']} is not implemented here")
    n, start, end = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
    if cfg["beta_schedule"] == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float32) ** 2
    elif cfg["beta_schedule"] == "linear":
        betas = np.linspace(start, end, n, dtype=np.float32)
    else:
        raise SystemExit(f"beta_schedule {cfg['beta_schedule']!r} is not implemented here")
    return np.cumprod(np.float32(1.0) - betas, dtype=np.float32)


def ddim_timesteps(cfg: dict, steps: int) -> np.ndarray:
    """DDIMScheduler.set_timesteps: the timesteps visited, first to last."""
    n = cfg["num_train_timesteps"]
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing == "leading":
        return (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + cfg.get("steps_offset", 0)
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    raise SystemExit(f"timestep_spacing {spacing!r} is not implemented here")


def ddim_step(cfg: dict, alphas: np.ndarray, steps: int, noise: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
    """DDIMScheduler.step with eta 0: the latents at the previous timestep."""
    prev = t - cfg["num_train_timesteps"] // steps
    final = np.float32(1.0) if cfg.get("set_alpha_to_one", True) else alphas[0]
    a_t, a_prev = alphas[t], alphas[prev] if prev >= 0 else final
    b_t = np.float32(1.0) - a_t
    kind = cfg.get("prediction_type", "epsilon")
    if kind == "epsilon":
        x0, eps = (x - b_t ** 0.5 * noise) / a_t ** 0.5, noise
    elif kind == "v_prediction":
        x0, eps = a_t ** 0.5 * x - b_t ** 0.5 * noise, a_t ** 0.5 * noise + b_t ** 0.5 * x
    elif kind == "sample":
        x0, eps = noise, (x - a_t ** 0.5 * noise) / b_t ** 0.5
    else:
        raise SystemExit(f"prediction_type {kind!r} is not implemented here")
    if cfg.get("clip_sample"):
        r = cfg.get("clip_sample_range", 1.0)
        x0 = np.clip(x0, -r, r)
    return (a_prev ** 0.5 * x0 + (np.float32(1.0) - a_prev) ** 0.5 * eps).astype(np.float32)


def session(manifest: dict, component: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(HERE / manifest["graphs"][component]["path"]), providers=["CPUExecutionProvider"])


def feed_dtype(manifest: dict, component: str, name: str) -> type:
    return np.dtype(manifest["graphs"][component]["inputs"][name]["dtype"]).type


def encode(manifest: dict, text_encoder: ort.InferenceSession, prompts: list) -> np.ndarray:
    """Text states [N, tokens, D] for the prompts."""
    spec = manifest["tokenizer"]
    tok = Tokenizer.from_file(str(HERE / "tokenizer" / "tokenizer.json"))
    tok.enable_truncation(spec["max_length"])
    tok.enable_padding(length=spec["max_length"], pad_id=spec["pad_id"], pad_token=spec["pad_token"])
    enc = tok.encode_batch(prompts)
    feeds = {"input_ids": np.array([e.ids for e in enc], dtype=feed_dtype(manifest, "text_encoder", "input_ids"))}
    if "attention_mask" in manifest["graphs"]["text_encoder"]["inputs"]:
        feeds["attention_mask"] = np.array([e.attention_mask for e in enc],
                                           dtype=feed_dtype(manifest, "text_encoder", "attention_mask"))
    return text_encoder.run(None, feeds)[0].astype(np.float32)


def generate(manifest: dict, prompt: str, noise: np.ndarray, steps: int, guidance: float) -> np.ndarray:
    """The image [H, W, 3] uint8 for one prompt from the starting noise [1, C, h, w]."""
    sched = manifest["scheduler"]
    if sched["type"] != "DDIMScheduler":
        raise SystemExit(f"scheduler {sched['type']}: only DDIMScheduler is implemented here")
    if manifest["guidance"]["convention"] != "classifier-free":
        raise SystemExit(f"guidance convention {manifest['guidance']['convention']!r} is not implemented here")
    cfg = sched["config"]
    alphas = ddim_alphas(cfg)
    unet, text = session(manifest, "unet"), session(manifest, "text_encoder")
    guided = guidance > 1.0
    prompts = [manifest["sampling"]["negative_prompt"], prompt] if guided else [prompt]
    context = encode(manifest, text, prompts)
    sample_type = feed_dtype(manifest, "unet", "sample")
    x = noise.astype(np.float32) * np.float32(sched["init_noise_sigma"])
    for t in ddim_timesteps(cfg, steps):
        model_in = np.concatenate([x] * len(prompts))
        pred = unet.run(None, {"sample": model_in.astype(sample_type),
                               "timestep": np.array([t], dtype=feed_dtype(manifest, "unet", "timestep")),
                               "encoder_hidden_states": context.astype(sample_type)})[0].astype(np.float32)
        if guided:
            pred = pred[:1] + np.float32(guidance) * (pred[1:] - pred[:1])
        x = ddim_step(cfg, alphas, steps, pred, int(t), x)
    decoder = session(manifest, "vae_decoder")
    z = (x / np.float32(manifest["latents"]["decoder_divisor"])).astype(feed_dtype(manifest, "vae_decoder",
                                                                                     "latent_sample"))
    image = decoder.run(None, {"latent_sample": z})[0].astype(np.float32)[0]
    return (np.clip(image / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """An 8-bit RGB PNG of pixels [H, W, 3] (standard library only)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def main() -> None:
    manifest = json.loads((HERE / "manifest.json").read_text())
    lat, samp = manifest["latents"], manifest["sampling"]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0, help="numpy noise seed (ignored with --noise)")
    p.add_argument("--noise", type=Path, default=None, help=".npy starting noise [1, C, h, w]")
    p.add_argument("--steps", type=int, default=samp["steps"])
    p.add_argument("--guidance-scale", type=float, default=samp["guidance_scale"])
    p.add_argument("--size", type=int, default=manifest["resolutions"]["native"], help="image side in pixels")
    p.add_argument("--out", type=Path, default=Path("image.png"))
    args = p.parse_args()
    side = args.size // lat["vae_scale_factor"]
    noise = (np.load(args.noise) if args.noise else
             np.random.default_rng(args.seed).standard_normal((1, lat["channels"], side, side)))
    write_png(args.out, generate(manifest, args.prompt, noise, args.steps, args.guidance_scale))
    print(args.out)


if __name__ == "__main__":
    main()
