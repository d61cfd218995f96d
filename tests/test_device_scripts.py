"""scripts/device/: the GPU host's shared library and jobs, run here on a simulated host.

The simulated host is a temporary copy of the tree (so the namespace links lib.sh makes never land
in the real checkout), PD_TMP pointing at a temporary "machine /tmp", $OUT a temporary folder and
python3 this repository's .venv interpreter. Calls are simulated by changing which carry sets the
copy holds between runs, as the device tool does. No GPU: lib.sh must say so and carry on.
"""

from __future__ import annotations

import json
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "scripts" / "device"
SCRIPTS = sorted(p for p in (ROOT / "scripts").rglob("*.sh"))
MIB = 1 << 20

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in ("bash", "flock", "xz")),
                                reason="needs bash, flock and xz")

# Stands in for python3 on the host: `python3 -m pocketdiff run` is replaced (no GPU here) by a
# stub that writes a run folder the way the runner does and exits with $STUB_RC; anything else
# runs in this repository's interpreter.
PYTHON_STUB = f"""#!/bin/sh
if [ "$1 $2 $3" = "-m pocketdiff run" ]; then
  out=$(echo "$@" | sed 's/.*--out \\([^ ]*\\).*/\\1/')
  mkdir -p "$out/01-cast/unet" "$out/01-cast/vae"
  echo w > "$out/01-cast/unet/diffusion_pytorch_model.safetensors"; echo {{}} > "$out/01-cast/unet/config.json"
  echo w > "$out/01-cast/vae/diffusion_pytorch_model.safetensors"; echo {{}} > "$out/01-cast/vae/config.json"
  echo {{}} > "$out/01-cast/pocketdiff.json"; echo {{}} > "$out/01-cast/stage.json"; printf '{{"step": 1, "elapsed_s": 1.0}}\n{{"step": 11, "elapsed_s": 3.0}}\n' > "$out/01-cast/unet_log.jsonl"
  echo '{{"stages": [{{"folder": "01-cast"}}]}}' > "$out/run.json"
  echo "stub run: $*"
  exit "${{STUB_RC:-0}}"
fi
if [ "$1 $2" = "-m accelerate.commands.launch" ]; then
  echo "stub launch: $*"
  exit "${{STUB_RC:-0}}"
fi
exec {sys.executable} "$@"
"""


def fake_wheel(folder: Path) -> None:
    """A minimal pure-Python wheel (module pdfake), installed like the carried ones."""
    folder.mkdir(parents=True)
    info = "pdfake-0.1.dist-info"
    with zipfile.ZipFile(folder / "pdfake-0.1-py3-none-any.whl", "w") as z:
        z.writestr("pdfake/__init__.py", "VALUE = 7\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: pdfake\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


class Host:
    """A simulated GPU host: tree copy, machine /tmp, $OUT, PATH with the python3 stand-in."""

    def __init__(self, tmp: Path):
        self.root, self.machine, self.out, self.bin = tmp / "tree", tmp / "machine", tmp / "out", tmp / "bin"
        skip = shutil.ignore_patterns("__pycache__", "weights", "*.egg-info")
        for d in ("pocketdiff", "compress", "export", "runtimes", "scripts"):
            shutil.copytree(ROOT / d, self.root / d, ignore=skip, symlinks=True)
        (self.root / "bench").mkdir()
        (self.root / "bench" / "echo_args.py").write_text(
            "import sys\nprint('args', *sys.argv[1:])\nsys.exit(int(sys.argv[1]) if sys.argv[1:] else 0)\n")
        for d in (self.machine, self.out, self.bin):
            d.mkdir()
        (self.bin / "python3").write_text(PYTHON_STUB)
        (self.bin / "python3").chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PD_", "POCKETDIFF_", "PYTHON"))}
        self.env.update(PATH=f"{self.bin}:{os.environ['PATH']}", PD_TMP=str(self.machine), OUT=str(self.out))

    def carry(self, files: dict[str, bytes]) -> None:
        """This call's carry sets: .dev/ and .whl/ hold exactly `files` (path -> content)."""
        for d in (".dev", ".whl"):
            shutil.rmtree(self.root / d, ignore_errors=True)
        for rel, data in files.items():
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(data)

    def warm(self) -> None:
        """The imports were checked by an earlier call (lib.sh keeps the line it printed)."""
        (self.machine / "pd").mkdir(exist_ok=True)
        (self.machine / "pd" / ".versions").write_text("versions checked by an earlier call\n")

    def bash(self, script: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", script], cwd=self.root, env={**self.env, **env},
                              capture_output=True, text=True, timeout=60)


@pytest.fixture()
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_scripts_parse():
    assert DEVICE / "lib.sh" in SCRIPTS and (DEVICE / "jobs" / "recipe.sh") in SCRIPTS
    for script in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    # scripts/device/ only: the archive is a record, kept as it ran
    ours = [str(p) for p in SCRIPTS if DEVICE in p.parents and "archive" not in p.parts]
    r = subprocess.run(["shellcheck", "-x", *ours], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout


def test_three_calls_unpack_and_reassemble_inception(host: Host):
    images = os.urandom(4096)
    inception = os.urandom(3001)
    sha = hashlib.sha256(inception).hexdigest().encode() + b"\n"
    show = '. scripts/device/lib.sh || exit; echo "INC=${POCKETDIFF_INCEPTION:-none} TEXT=$POCKETDIFF_TEXT_STATES"'
    pd = host.machine / "pd"

    host.carry({".dev/call1/data/train-images-idx3-ubyte.xz": lzma.compress(images),
                ".dev/call1/data/train-labels-idx1-ubyte.gz": b"labels",
                ".dev/call1/data/captions.safetensors.xz": lzma.compress(b"states")})
    fake_wheel(host.root / ".whl")
    r = host.bash(show)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gpu: none found" in r.stdout and "diffusers" in r.stdout  # the versions line
    assert (pd / "data" / "train-images-idx3-ubyte").read_bytes() == images
    assert (pd / "data" / "captions.safetensors").read_bytes() == b"states"
    assert (pd / "data" / "train-labels-idx1-ubyte.gz").read_bytes() == b"labels"
    assert (host.machine / "site" / "pdfake" / "__init__.py").is_file()
    assert (host.root / "pocketdiff" / "export").resolve() == (host.root / "export").resolve()
    assert f"INC=none TEXT={pd}/data/captions.safetensors" in r.stdout
    r = host.bash(show)  # the same sets carried again (or left in the tree): nothing to redo
    assert r.returncode == 0 and "pd: staged" not in r.stdout and "installed" not in r.stdout

    host.carry({".dev/call2/data/t10k-images-idx3-ubyte.gz": b"test images",
                ".dev/call2/inception/part1": inception[:1500], ".dev/call2/inception/sha256": sha})
    r = host.bash(show + '; pd_need "$PD_HOME/inception_fp16.pt"')
    assert r.returncode == 3 and "INC=none" in r.stdout
    assert "COLD MACHINE: carry .dev/call3" in r.stderr
    assert "installed" not in r.stdout  # the wheels are in /tmp/site already
    assert (pd / "data" / "t10k-images-idx3-ubyte.gz").read_bytes() == b"test images"

    host.carry({".dev/call3/inception/part2": inception[1500:], ".dev/call3/inception/sha256": sha})
    r = host.bash(show + '; pd_need "$PD_HOME/inception_fp16.pt" && python3 -c "import pdfake; print(pdfake.VALUE)"')
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sha256 checks" in r.stdout and f"INC={pd}/inception_fp16.pt" in r.stdout and "\n7\n" in r.stdout
    assert (pd / "inception_fp16.pt").read_bytes() == inception
    assert not list((pd / "inception").iterdir())  # the halves are gone once assembled


def test_broken_or_mixed_inception_halves(host: Host):
    host.warm()
    inception = os.urandom(2000)
    sha = hashlib.sha256(inception).hexdigest().encode()
    inc = host.machine / "pd" / "inception"
    host.carry({".dev/call2/inception/part1": inception[:1000], ".dev/call2/inception/sha256": sha})
    assert host.bash(". scripts/device/lib.sh").returncode == 0
    host.carry({".dev/call3/inception/part2": b"x" + inception[1001:], ".dev/call3/inception/sha256": sha})
    r = host.bash('. scripts/device/lib.sh || exit; echo "INC=${POCKETDIFF_INCEPTION:-none}"')
    assert "do not give the sha256" in r.stderr and "INC=none" in r.stdout
    assert not (host.machine / "pd" / "inception_fp16.pt").exists()

    # a half from another staging than the one just carried is dropped, and pd_need says which call to repeat
    host.carry({".dev/call2/inception/part1": inception[:1000], ".dev/call2/inception/sha256": sha})
    assert host.bash(". scripts/device/lib.sh").returncode == 0
    host.carry({".dev/call3/inception/part2": b"other", ".dev/call3/inception/sha256": b"0" * 64})
    r = host.bash('. scripts/device/lib.sh || exit; pd_need "$PD_HOME/inception_fp16.pt"')
    assert "part1 came from another staging" in r.stderr and "COLD MACHINE: carry .dev/call2" in r.stderr
    assert sorted(p.name for p in inc.iterdir()) == ["part2", "part2.sha256"]


def test_pd_out_keeps_to_what_comes_back(host: Host):
    host.warm()
    (host.root / "w").mkdir()
    with open(host.root / "w" / "big.bin", "wb") as f:
        f.truncate(17 * MIB)
    (host.root / "w" / "bad name.txt").write_text("x")
    for i in range(9):
        (host.root / "w" / f"f{i}.txt").write_text(str(i))

    def out(args: str) -> subprocess.CompletedProcess:
        return host.bash(f". scripts/device/lib.sh >/dev/null || exit; {args}")

    assert out("pd_out . 'w/bad name.txt'").returncode == 1
    r = out("pd_out . w/big.bin")
    assert r.returncode == 1 and "at most 16777216" in r.stderr
    assert out("pd_out a/b/c w/f0.txt").returncode == 1
    assert out("pd_out 'a b' w/f0.txt").returncode == 1
    assert not any(host.out.iterdir())  # nothing copied by a refused call
    assert out("pd_out a/b w/f0.txt").returncode == 0 and (host.out / "a" / "b" / "f0.txt").read_text() == "0"
    r = out("pd_out a/b w/f0.txt")
    assert r.returncode == 1 and "already holds" in r.stderr
    r = out("pd_out . w/f1.txt w/f2.txt w/f3.txt w/f4.txt w/f5.txt w/f6.txt w/f7.txt w/f8.txt")
    assert r.returncode == 1 and "at most 8" in r.stderr
    assert out("pd_out . w/f1.txt w/f2.txt w/f3.txt w/f4.txt w/f5.txt").returncode == 0
    log = out("pd_out_new run.log && pd_out_new run.log")
    assert log.returncode == 0 and log.stdout.split() == [f"{host.out}/run.log", f"{host.out}/run.2.log"]
    assert out("pd_out_new third.log").returncode == 1  # would be a ninth file

    shutil.rmtree(host.out)
    host.out.mkdir()
    r = out("pd_pack big w big.bin f0.txt")
    assert r.returncode == 0, r.stderr
    parts = sorted(host.out.iterdir())
    assert [p.name for p in parts] == ["big.tar.0", "big.tar.1"] and all(p.stat().st_size <= 16 * MIB for p in parts)
    (host.root / "whole.tar").write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(host.root / "whole.tar") as t:
        assert sorted(t.getnames()) == ["big.bin", "f0.txt"] and t.getmember("big.bin").size == 17 * MIB


@pytest.mark.parametrize("args", ["", "default run1", "default run1 10 extra", "nosuchrecipe run1 10",
                                  "default a/b 10", "default .. 10", "default run1 0", "default run1 1.5",
                                  "default run1 10 --set", "default run1 10 --set a.b=1 x",
                                  "PD_LAUNCH=torchrun default run1 10", "PD_LAUNCH=accelerate PD_PROCS=0 default run1 10"])
def test_recipe_argument_errors_print_usage(host: Host, args: str):
    env = " ".join(w for w in args.split() if w.startswith("PD_"))
    args = " ".join(w for w in args.split() if not w.startswith("PD_"))
    r = host.bash(f"env {env} scripts/device/jobs/recipe.sh {args}")
    assert r.returncode == 2 and "usage: scripts/device/jobs/recipe.sh RECIPE RUN_DIR SECONDS" in r.stderr
    assert not (host.machine / "pd").exists()  # refused before touching the machine


def test_recipe_cold_unfinished_finished(host: Host):
    host.warm()
    r = host.bash("scripts/device/jobs/recipe.sh default run1 60")
    assert r.returncode == 3 and "COLD MACHINE: carry .whl .dev/call1" in r.stderr

    data = host.machine / "pd" / "data"
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte.gz", "captions.safetensors"):
        (data / f).write_text("x")
    r = host.bash("scripts/device/jobs/recipe.sh default run1 60", STUB_RC="75")
    assert r.returncode == 75 and "[run1] UNFINISHED" in r.stdout and not any(host.out.iterdir())

    r = host.bash("scripts/device/jobs/recipe.sh default run1 60 & a=$!; scripts/device/jobs/recipe.sh default run2 60 & "
                  "b=$!; wait $a && wait $b")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[run1] FINISHED" in r.stdout and "[run2] FINISHED" in r.stdout
    assert sorted(p.name for p in host.out.iterdir()) == ["run1.tar", "run2.tar"]
    with tarfile.open(host.out / "run1.tar") as t:
        names = sorted(t.getnames())
    assert names == ["run1.log", "run1/01-cast/pocketdiff.json", "run1/01-cast/stage.json",
                     "run1/01-cast/unet/config.json", "run1/01-cast/unet/diffusion_pytorch_model.safetensors",
                     "run1/01-cast/unet_log.jsonl", "run1/01-cast/vae/config.json", "run1/run.json"]
    log = (host.machine / "pd" / "runs" / "run1.log").read_text()
    assert log.count("stub run: -m pocketdiff run default --out") == 2 and "--device cuda --time-limit 60" in log

    r = host.bash("PD_LAUNCH=accelerate PD_PROCS=2 scripts/device/jobs/recipe.sh default run3 60 --set cast.dtype=float16",
                  STUB_RC="75")
    assert r.returncode == 75 and "[run3] UNFINISHED" in r.stdout
    log = (host.machine / "pd" / "runs" / "run3.log").read_text()
    assert ("stub launch: -m accelerate.commands.launch --num_processes 2 --num_machines 1 --mixed_precision "
            "no --dynamo_backend no -m pocketdiff run default --set cast.dtype=float16 --out") in log


def test_bench_tees_its_log_and_keeps_the_status(host: Host):
    host.warm()
    r = host.bash("scripts/device/jobs/bench.sh echo_args 3 x")
    assert r.returncode == 3 and "args 3 x" in r.stdout
    assert (host.out / "echo_args.log").read_text() == "args 3 x\n"
    r = host.bash("scripts/device/jobs/bench.sh bench/echo_args.py 0")
    assert r.returncode == 0 and (host.out / "echo_args.2.log").read_text() == "args 0\n"
    r = host.bash("scripts/device/jobs/bench.sh nosuch")
    assert r.returncode == 2 and "usage:" in r.stderr


def test_detached_recipe_outlives_its_call_packs_nothing_and_wait_collects_it(host: Host):
    host.warm()
    data = host.machine / "pd" / "data"
    data.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte.gz", "captions.safetensors"):
        (data / f).write_text("x")
    r = host.bash("scripts/device/jobs/detach.sh job1 recipe.sh default run1 60")
    assert r.returncode == 0 and "[job1] detached: recipe.sh default run1 60" in r.stdout, r.stdout + r.stderr
    r = host.bash("scripts/device/jobs/wait.sh 20 1")  # a later call
    assert r.returncode == 0 and "[job1] ended, exit 0" in r.stdout, r.stdout + r.stderr
    assert "FINISHED: " in (host.machine / "pd" / "detached" / "job1.log").read_text()
    assert not any(host.out.iterdir())  # the collecting call packs, not the detached job
    assert (host.machine / "pd" / "runs" / "run1" / "01-cast" / "unet").is_dir()

    r = host.bash("scripts/device/jobs/detach.sh job2 recipe.sh default run2 60", STUB_RC="75")
    r = host.bash("scripts/device/jobs/wait.sh 20 1")
    assert r.returncode == 0 and "[job2] ended, exit 75" in r.stdout
    for args in ("", "job3", "a/b recipe.sh", "job3 nosuch.sh"):
        r = host.bash(f"scripts/device/jobs/detach.sh {args}")
        assert r.returncode == 2 and "usage: scripts/device/jobs/detach.sh" in r.stderr


def test_wait_returns_75_while_a_detached_job_runs(host: Host):
    host.warm()
    (host.root / "scripts" / "device" / "jobs" / "sleeper.sh").write_text("#!/bin/sh\nsleep 30\n")
    (host.root / "scripts" / "device" / "jobs" / "sleeper.sh").chmod(0o755)
    assert host.bash("scripts/device/jobs/detach.sh slow sleeper.sh").returncode == 0
    r = host.bash("scripts/device/jobs/wait.sh 2 1")
    assert r.returncode == 75 and "[slow] running" in r.stdout and "1 still running" in r.stdout
    pid = int((host.machine / "pd" / "detached" / "slow.pid").read_text())
    os.killpg(pid, 15)


def test_pack_stages_brings_fp16_unets_and_logs_and_skips_missing_stages(host: Host):
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    host.warm()
    stage = host.machine / "pd" / "runs" / "prog" / "01-guided-distill"
    UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         cross_attention_dim=8, attention_head_dim=2,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(stage / "unet")
    (stage / "vae").mkdir()
    (stage / "vae" / "big.bin").write_bytes(b"v" * 1000)
    (stage / "pocketdiff.json").write_text("{}")
    (stage / "guided-distill_log.jsonl").write_text("{}\n")
    (stage.parent / "run.json").write_text("{}")
    (stage.parent.parent / "prog.log").write_text("log\n")
    slim = host.machine / "pd" / "runs" / "slim" / "03-light-decoder"
    shutil.copytree(stage / "unet", slim / "unet")
    AutoencoderTiny(encoder_block_out_channels=(4,), decoder_block_out_channels=(4,), num_encoder_blocks=(1,),
                    num_decoder_blocks=(1,), latent_channels=4).save_pretrained(slim / "vae")
    r = host.bash(f"scripts/device/jobs/pack_stages.sh students {stage} {stage.parent / '02-progressive'} {slim}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipped" in r.stdout and "packed 2 stages" in r.stdout and "(U-Net and light decoder fp16)" in r.stdout
    with tarfile.open(host.out / "students.tar") as t:
        names = set(t.getnames())
        t.extractall(host.out / "x")
    assert {"prog/01-guided-distill/pocketdiff.json", "logs/runs/prog.log", "logs/runs/prog/run.json",
            "logs/runs/prog/01-guided-distill/guided-distill_log.jsonl"} <= names
    weights = load_file(host.out / "x" / "prog" / "01-guided-distill" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any(n.startswith("prog/") and "vae" in n for n in names)
    assert {w.dtype for w in weights.values()} == {torch.float16}
    light = load_file(host.out / "x" / "slim" / "03-light-decoder" / "vae" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in light.values()} == {torch.float16}


def test_leave_out_keeps_paths_from_the_carried_tree_and_restores_them(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "scripts" / "device").mkdir(parents=True)
    shutil.copy2(DEVICE / "leave_out.sh", repo / "scripts" / "device")
    (repo / "w" / "student").mkdir(parents=True)
    (repo / "w" / "student" / "big.bin").write_bytes(b"x" * 4096)
    (repo / "keep.txt").write_text("k\n")
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    run = lambda *a: subprocess.run(["bash", "scripts/device/leave_out.sh", *a], cwd=repo, capture_output=True, text=True)
    r = run("w/student/")
    assert r.returncode == 0 and "left out w/student" in r.stdout, r.stderr
    # what travels: tracked files and untracked ones git does not ignore
    travels = git("ls-files", "--cached", "--others", "--exclude-standard").split()
    assert "w/student/big.bin" not in travels and "keep.txt" in travels
    assert (repo / "w" / "student" / "big.bin").is_file()
    assert run("nosuch").returncode == 2
    r = run("--restore")
    assert r.returncode == 0 and git("status", "--porcelain") == ""
    assert "w/student/big.bin" in git("ls-files").split() and run("--restore").stdout.startswith("leave_out: nothing")


def test_plan_recipes_sizes_passes_from_a_probe_run(tmp_path: Path):
    def log(folder: Path, rows: list[tuple[int, float]]) -> None:
        folder.mkdir(parents=True)
        (folder / "x_log.jsonl").write_text("".join(json.dumps({"step": s, "elapsed_s": e}) + "\n" for s, e in rows))

    # finished stage: 0.5 s/step once warm; the first interval (warm-up, 2 s/step) does not count
    log(tmp_path / "01-recover", [(0, 10.0), (10, 30.0), (20, 35.0), (30, 40.0)])
    log(tmp_path / ".work" / "02-light-decoder-abc", [(5, 1.0), (15, 3.0)])  # unfinished: 0.2 s/step
    plan = [sys.executable, str(DEVICE / "plan_recipes.py")]
    r = subprocess.run([*plan, "100", str(tmp_path), "recover:0.6", "light-decoder"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["--set", "recover.iterations=120", "--set", "light-decoder.iterations=200"]
    r = subprocess.run([*plan, "100", str(tmp_path), "recover:0.5", "light-decoder:0.3"], capture_output=True, text=True)
    assert r.stdout.split() == ["--set", "recover.iterations=100", "--set", "light-decoder.iterations=150"]
    r = subprocess.run([*plan, "100", str(tmp_path), "recover:1", "light-decoder"], capture_output=True, text=True)
    assert r.returncode == 1 and "leave 0.00 of the time" in r.stderr
    r = subprocess.run([*plan, "100", str(tmp_path), "dmd"], capture_output=True, text=True)
    assert r.returncode == 1 and "0 log line(s) of pass 'dmd'" in r.stderr


def test_sized_probes_side_by_side_then_detaches_runs_sized_from_the_probes(host: Host, tmp_path: Path):
    host.warm()
    data = host.machine / "pd" / "data"
    data.mkdir(parents=True, exist_ok=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte.gz", "captions.safetensors"):
        (data / f).write_text("x")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("# name recipe size args\n"
                    "a default cast --probe-set cast.x=1\n"
                    "b default =a --set cast.dtype=float16 PD_LAUNCH=accelerate\n"
                    "c default nope\n")
    r = host.bash(f"scripts/device/jobs/sized.sh 5 100 200 {jobs} && scripts/device/jobs/wait.sh 30 1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[a] recipe.sh default a 200 --set cast.iterations=500" in r.stdout  # 0.2 s/step from the probe's log
    assert "[b] PD_LAUNCH=accelerate recipe.sh default b 200 --set cast.dtype=float16 --set cast.iterations=500" in r.stdout
    assert "[c] NOT STARTED: its probe gave no rate" in r.stdout
    runs = host.machine / "pd" / "runs"
    assert "--set cast.x=1 --set cast.log_every=5" in (runs / "probe-a.log").read_text()
    assert "--set cast.x=1" not in (runs / "a.log").read_text()
    assert "accelerate.commands.launch --num_processes 1" in (runs / "b.log").read_text()
    r = host.bash(f"echo 'd default' > {jobs} && scripts/device/jobs/sized.sh 5 100 200 {jobs}")
    assert r.returncode == 2 and "needs NAME RECIPE SIZE" in r.stderr
