# Time 100 real training steps at batch $1 (after data load) and write to /tmp/pd/steps how many
# steps fit in $2 seconds of training loop, so the cosine schedule ends where the time does.
python3 -m pocketdiff train teacher --out /tmp/probe/fashion --vae-from pocketdiff/weights/fashion --unet-from pocketdiff/weights/fashion --data /tmp/pd/data --captions-cache /tmp/pd/data/captions.safetensors --unet-steps 101 --unet-batch $1 --checkpoint-every 1000 --json > /tmp/probe.json 2>/tmp/probe.err || { tail -5 /tmp/probe.err; exit 5; }
python3 - "$2" <<'PY'
import json, sys
rows = [json.loads(l) for l in open("/tmp/probe/.fashion.train/unet_log.jsonl")]
at = {r["step"]: r["elapsed_s"] for r in rows}
per_step = (at[100] - at[50]) / 50
steps = int(0.95 * float(sys.argv[1]) / per_step)
print(f"probe: {per_step:.4f} s/step -> {steps} steps in {sys.argv[1]} s")
open("/tmp/pd/steps", "w").write(str(steps))
PY
