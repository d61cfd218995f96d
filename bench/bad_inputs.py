"""Bad input through the real CLI: every case is `python -m pocketdiff ...` in a fresh folder, checked for
its exit code, no traceback, one `pocketdiff:` line, nothing left behind and every user file kept.

Cases are data: append a `Case` to `CASES` (a `setup` makes the files the case needs, canaries included;
`interrupt` sends a signal once a marker appears on stderr). Prints one row per case and the totals.

    .venv/bin/python bench/bad_inputs.py [--jobs 2] [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Case:
    """One bad input: `argv` after `pocketdiff` ("{dir}" is the case's folder, also its working folder)."""

    name: str
    argv: list[str]
    expect_exit: int = 2
    setup: Callable[[Path], None] | None = None
    interrupt: tuple[int, str | None] | None = None  # (signal, stderr marker; None: 0.5 s after start)
    env: dict[str, str] = field(default_factory=dict)


def canary_folder(name: str) -> Callable[[Path], None]:
    """Setup: a user's folder `name` holding a canary file."""
    def make(d: Path) -> None:
        (d / name).mkdir()
        (d / name / "canary.txt").write_text("user data")
    return make


def user_file(name: str) -> Callable[[Path], None]:
    """Setup: a user's file `name`."""
    def make(d: Path) -> None:
        (d / name).write_text("user data")
    return make


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    """Setup: each of `setups` in turn."""
    def make(d: Path) -> None:
        for s in setups:
            s(d)
    return make


def symlink_to_canary(d: Path) -> None:
    """Setup: `link` pointing at a canary folder."""
    canary_folder("target")(d)
    (d / "link").symlink_to(d / "target")


def bad_idx(d: Path) -> None:
    """Setup: a data folder whose idx files are garbage."""
    (d / "data").mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (d / "data" / stem).write_bytes(b"not an idx file")


def junk_artifacts(d: Path) -> None:
    """Setup: a folder whose artifacts.json is not JSON."""
    (d / "art").mkdir()
    (d / "art" / "artifacts.json").write_text("{not json")


GEN = ["generate", "arch:tiny", "-p", "x", "--out", "imgs"]
EVAL = ["eval", "arch:tiny", "--samples", "4", "--reference-samples", "8", "--steps", "1"]
EXPORT = ["export", "arch:tiny", "--out", "art"]
INFO = ["info", "arch:tiny"]
VALIDATE = ["validate", "art"]


TINY_LCM = 'model = "arch:tiny"\n[[pass]]\nname = "lcm"\niterations = 2\nbatch_size = 4\ndata_limit = 16\n'
RUN = ["run", "r.toml", "--out", "r", "--device", "cpu"]
TRAIN = ["train", "teacher", "--out", "t", "--device", "cpu", "--data-limit", "8"]


def recipe(text: str, then: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """Setup: the recipe file r.toml holding `text` (and whatever `then` makes)."""
    def make(d: Path) -> None:
        (d / "r.toml").write_text(text)
        if then:
            then(d)
    return make


def _values(base: list[str], flag: str, values: list[str], expect: int = 2) -> list[Case]:
    return [Case(f"{base[0]} {flag} {v}", [*base, flag, v], expect) for v in values]


CASES: list[Case] = [
    *_values(GEN, "--guidance-scale", ["nan", "-1", "inf", "-inf", "1e309", "abc", "101"]),
    *_values(GEN, "--steps", ["0", "-5", "1001", "2.5", "abc"]),
    Case("generate lcm over its 50 steps", [*GEN, "--scheduler", "lcm", "--steps", "51"]),
    Case("generate lcm 200 steps", [*GEN, "--scheduler", "lcm", "--steps", "200"]),
    *_values(GEN, "--seed", ["-1", str(2**63), str(2**70), "abc", "1.5"]),
    Case("generate seed + images past int64", [*GEN, "--seed", str(2**63 - 1), "-n", "2"]),
    *_values(GEN, "--height", ["0", "-64", "8192", "99999", "abc"]),
    *_values(GEN, "--width", ["0", "-1", "8192"]),
    Case("generate height not a multiple", [*GEN, "--height", "30"]),
    *_values(GEN, "--batch-size", ["0", "-1", "abc"]),
    *_values(GEN, "-n", ["0", "-2", "10001", "abc"]),
    *_values(GEN, "--scheduler", ["bogus", ""]),
    Case("generate unknown flag", [*GEN, "--colour", "red"]),
    Case("generate without a prompt", ["generate", "arch:tiny", "--out", "imgs"]),
    Case("generate two models", [*GEN, "arch:tiny"]),
    Case("generate --json bad steps", [*GEN, "--steps", "0", "--json"]),
    Case("generate --json missing model", ["generate", "nowhere", "-p", "x", "--out", "imgs", "--json"]),
    Case("generate --out foreign folder", GEN, setup=canary_folder("imgs")),
    Case("generate --out a file", GEN, setup=user_file("imgs")),
    Case("generate --out .", ["generate", "arch:tiny", "-p", "x", "--out", "."], setup=user_file("keep.txt")),
    Case("generate --out ..", ["generate", "arch:tiny", "-p", "x", "--out", ".."]),
    Case("generate --out its own cwd by path", ["generate", "arch:tiny", "-p", "x", "--out", "{dir}"]),
    Case("generate --out unwritable", ["generate", "arch:tiny", "-p", "x", "--out", "/sys/pocketdiff-out"]),
    Case("generate --out under a file", ["generate", "arch:tiny", "-p", "x", "--out", "f/imgs"], setup=user_file("f")),
    Case("generate --out a symlink", ["generate", "arch:tiny", "-p", "x", "--out", "link"], setup=symlink_to_canary),
    Case("generate --out empty string", ["generate", "arch:tiny", "-p", "x", "--out", ""]),
    Case("generate missing model", ["generate", "nowhere", "-p", "x", "--out", "imgs"]),
    Case("generate unknown arch", ["generate", "arch:bogus", "-p", "x", "--out", "imgs"]),
    Case("generate empty folder as model", ["generate", "m", "-p", "x", "--out", "imgs"],
         setup=lambda d: (d / "m").mkdir()),
    Case("generate text file as model", ["generate", "m.txt", "-p", "x", "--out", "imgs"], setup=user_file("m.txt")),
    *_values(EVAL, "--samples", ["0", "-3", "70000", "abc"]),
    *_values(EVAL, "--reference-samples", ["0", "-1", "20000"]),
    *_values(EVAL, "--guidance-scale", ["nan", "-2"]),
    *_values(EVAL, "--batch-size", ["0"]),
    *_values(EVAL, "--device", ["bogus", "cuda:7", "tpu"]),
    Case("eval --data nowhere", [*EVAL, "--data", "nowhere"]),
    Case("eval --data empty folder", [*EVAL, "--data", "data"], setup=lambda d: (d / "data").mkdir()),
    Case("eval --data garbage idx files", [*EVAL, "--data", "data"], setup=bad_idx),
    Case("eval --reference nowhere", [*EVAL, "--reference", "nowhere"]),
    Case("eval missing model", ["eval", "nowhere", "--samples", "4"]),
    *_values(INFO, "--resolution", ["0", "-1", "100000", "abc", "30"]),
    Case("info missing model", ["info", "nowhere"]),
    Case("info unknown arch", ["info", "arch:bogus"]),
    Case("info --json missing model", ["info", "nowhere", "--json"]),
    Case("info unknown flag", [*INFO, "--bogus"]),
    Case("no command", []),
    Case("unknown command", ["bogus"]),
    Case("export --out foreign folder", EXPORT, setup=canary_folder("art")),
    Case("export --out a file", EXPORT, setup=user_file("art")),
    Case("export --out .", ["export", "arch:tiny", "--out", "."], setup=user_file("keep.txt")),
    Case("export --out ..", ["export", "arch:tiny", "--out", ".."]),
    Case("export --out unwritable", ["export", "arch:tiny", "--out", "/sys/pocketdiff-art"]),
    Case("export --out under a file", ["export", "arch:tiny", "--out", "f/art"], setup=user_file("f")),
    Case("export --out a symlink", ["export", "arch:tiny", "--out", "link"], setup=symlink_to_canary),
    Case("export without --out", ["export", "arch:tiny"]),
    *_values(EXPORT, "--targets", ["bogus", "onnx,onnx", ",", "", "onnx,bogus"]),
    *_values(EXPORT, "--components", ["bogus", "", "unet,unet"]),
    *_values(EXPORT, "--precision", ["fp8"]),
    *_values(EXPORT, "--batch-sizes", ["0", "-1", "abc", "1000"]),
    *_values(EXPORT, "--resolutions", ["0", "99999", "30"]),
    *_values(EXPORT, "--winograd", ["f3"]),
    Case("export coreml deployment target iOS9", [*EXPORT, "--targets", "coreml", "--deployment-target", "iOS9"]),
    Case("export missing model", ["export", "nowhere", "--out", "art"]),
    Case("export --json foreign folder", [*EXPORT, "--json"], setup=canary_folder("art")),
    Case("validate missing folder", VALIDATE),
    Case("validate empty folder", VALIDATE, setup=lambda d: (d / "art").mkdir()),
    Case("validate corrupt manifest", VALIDATE, setup=junk_artifacts),
    *_values(VALIDATE, "--steps", ["0", "1001"]),
    *_values(VALIDATE, "--seed", ["-1"]),
    Case("validate --report a folder", [*VALIDATE, "--report", "r"], setup=both(junk_artifacts, canary_folder("r"))),
    Case("validate --report unwritable", [*VALIDATE, "--report", "/sys/r.json"], setup=junk_artifacts),
    Case("validate --targets empty", [*VALIDATE, "--targets", ""], setup=junk_artifacts),
    Case("SIGTERM during export", EXPORT, 143, interrupt=(signal.SIGTERM, "exporting unet")),
    Case("SIGINT during export", EXPORT, 130, interrupt=(signal.SIGINT, "exporting vae_decoder")),
    Case("SIGTERM during export into an earlier export", EXPORT, 143,
         setup=lambda d: (canary_folder("art")(d), (d / "art" / "artifacts.json").write_text("{}")),
         interrupt=(signal.SIGTERM, "exporting unet")),
    Case("SIGTERM while sampling", [*GEN, "--steps", "1000"], 143, interrupt=(signal.SIGTERM, "ddim x1000")),
    Case("SIGINT while sampling", [*GEN, "--steps", "1000"], 130, interrupt=(signal.SIGINT, "ddim x1000")),
    Case("SIGINT during imports", INFO, 130, interrupt=(signal.SIGINT, None)),
    Case("SIGTERM during imports", GEN, 143, interrupt=(signal.SIGTERM, None)),
    Case("run missing recipe", ["run", "nope.toml", "--out", "r"]),
    Case("run recipe not TOML", RUN, setup=recipe("model = [")),
    Case("run unknown pass", RUN, setup=recipe('[[pass]]\nname = "sharpen"\n')),
    Case("run pass is a string", RUN, setup=recipe('pass = "x"\n')),
    Case("run model is a number", RUN, setup=recipe("model = 5\n")),
    Case("run [sample] is a number", RUN, setup=recipe("sample = 5\n")),
    Case("run [sample] prompts a string", RUN, setup=recipe('[sample]\nprompts = "abc"\n')),
    Case("run [sample] guidance nan", RUN, setup=recipe("[sample]\nguidance_scale = nan\n")),
    Case("run lcm negative guidance", RUN, setup=recipe(TINY_LCM + "guidance_min = -1.0\n")),
    Case("run lcm guidance range upside down", RUN, setup=recipe(TINY_LCM + "guidance_min = 7.0\nguidance_max = 3.0\n")),
    Case("run lcm more steps than its solver", RUN, setup=recipe(TINY_LCM + "ddim_timesteps = 5\nsample_steps = 8\n")),
    Case("run lcm unknown setting", RUN, setup=recipe(TINY_LCM + "lerning_rate = 1.0\n")),
    Case("run lcm iterations as text", RUN, setup=recipe(TINY_LCM.replace("iterations = 2", 'iterations = "2"'))),
    Case("run fold-guidance on a plain U-Net", RUN, setup=recipe('model = "arch:tiny"\n[[pass]]\nname = "fold-guidance"\n')),
    Case("run progressive on a plain U-Net", RUN, setup=recipe('model = "arch:tiny"\n[[pass]]\nname = "progressive"\n')),
    Case("run lcm from an lcm student", RUN, setup=recipe(TINY_LCM.replace('model = "arch:tiny"', 'model = "s"'),
                                                           lambda d: _student_folder(d / "s"))),
    Case("run --out a file", RUN, setup=recipe(TINY_LCM, user_file("r"))),
    Case("run --out foreign folder", RUN, setup=recipe(TINY_LCM, canary_folder("r"))),
    Case("run --out .", ["run", "r.toml", "--out", "."], setup=recipe(TINY_LCM)),
    Case("run --device bogus", [*RUN, "--device", "tpu9"], setup=recipe(TINY_LCM)),
    Case("run --device cuda without a GPU", [*RUN, "--device", "cuda"], setup=recipe(TINY_LCM)),
    Case("run --time-limit text", [*RUN, "--time-limit", "soon"], setup=recipe(TINY_LCM)),
    Case("train teacher --out a file", TRAIN, setup=user_file("t")),
    Case("train teacher --out foreign folder", TRAIN, setup=canary_folder("t")),
    Case("train teacher --unet-lr negative", [*TRAIN, "--unet-lr", "-1"]),
    Case("train teacher --vae-steps text", [*TRAIN, "--vae-steps", "many"]),
    Case("train teacher --uncond-prob above 1", [*TRAIN, "--uncond-prob", "1.5"]),
    Case("train teacher missing data", [*TRAIN, "--data", "nowhere"]),
    Case("train classifier --out a folder", ["train", "classifier", "--out", "c"], setup=canary_folder("c")),
]


def _student_folder(path: Path) -> None:
    """A guidance-conditioned tiny U-Net saved as a pipeline folder (an lcm stage's output shape)."""
    from pocketdiff.compress.distill.student import with_guidance_input
    from pocketdiff.zoo import build_arch

    bundle = build_arch("tiny")
    bundle.unet = with_guidance_input(bundle.unet)
    bundle.save(path)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` (links not followed) with a hash of its bytes ('dir' for folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(case: Case, root: Path) -> tuple[int, str, str, float]:
    """Run one case in `root`; (exit code, stdout, stderr, seconds)."""
    argv = [a.replace("{dir}", str(root)) for a in case.argv]
    env = {**os.environ, "POCKETDIFF_CACHE": str(root.parent / "cache"), **case.env}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pocketdiff", *argv], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = b""
    if case.interrupt is not None:
        sig, marker = case.interrupt
        if marker is None:
            time.sleep(0.5)
        else:
            while marker.encode() not in err and (chunk := proc.stderr.read1(4096)):
                err += chunk
        proc.send_signal(sig)
    out, rest = proc.communicate()
    return proc.returncode, out.decode(errors="replace"), (err + rest).decode(errors="replace"), time.monotonic() - t0


def check(case: Case, base: Path) -> dict:
    """Run `case` in a fresh folder under `base`; the verdict of each check."""
    outer = Path(tempfile.mkdtemp(dir=base))
    root = outer / "case"
    root.mkdir()
    if case.setup:
        case.setup(root)
    before, outer_before = _snapshot(root), set(_snapshot(outer))
    code, out, err, seconds = _run(case, root)
    after = _snapshot(root)
    lines = [line for line in err.splitlines() if line.startswith("pocketdiff:")]
    json_ok = True
    if "--json" in case.argv:
        try:
            json_ok = "error" in json.loads(out)
        except ValueError:
            json_ok = False
    new = sorted(set(_snapshot(outer)) - outer_before - {f"case/{k}" for k in after})
    return {"name": case.name, "exit": code, "expect": case.expect_exit, "seconds": round(seconds, 1),
            "exit_ok": code == case.expect_exit, "traceback": "Traceback" in err,
            "one_line": len(lines) == 1 and "usage:" not in err and json_ok,
            "left_behind": sorted(set(after) - set(before)) + new,
            "lost": sorted(k for k, v in before.items() if after.get(k) != v),
            "message": (lines or err.strip().splitlines() or [""])[-1][:110]}


def main() -> int:
    """Run every case (in parallel), print the table and totals; exit 1 if any check failed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    args = ap.parse_args()
    cases = [c for c in CASES if args.only in c.name]
    with tempfile.TemporaryDirectory(prefix="pocketdiff-bad-") as base, ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda c: check(c, Path(base)), cases))
    print(f"{'case':<46}{'exit':>5}{'want':>5}  {'ok':<3} message")
    for r in rows:
        ok = r["exit_ok"] and not r["traceback"] and r["one_line"] and not r["left_behind"] and not r["lost"]
        flags = "".join(f" [{k}: {r[k]}]" for k in ("left_behind", "lost") if r[k])
        flags += " [traceback]" if r["traceback"] else ""
        flags += "" if r["one_line"] else " [not one line]"
        print(f"{r['name'][:45]:<46}{r['exit']:>5}{r['expect']:>5}  {'ok' if ok else 'BAD':<3} {r['message']}{flags}")
    totals = {"cases": len(rows), "wrong exit codes": sum(not r["exit_ok"] for r in rows),
              "tracebacks": sum(r["traceback"] for r in rows), "not one line": sum(not r["one_line"] for r in rows),
              "files left behind": sum(bool(r["left_behind"]) for r in rows),
              "user files lost": sum(bool(r["lost"]) for r in rows)}
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    return 0 if sum(totals.values()) == totals["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
