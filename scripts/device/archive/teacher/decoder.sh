# Decoder fine-tune variants (encoder, U-Net and latent space kept; pocketdiff/teacher/decoder.py), one
# process per adversarial weight in $WEIGHTS, side by side on the GPU. `decoder.sh probe BUDGET` times 100
# steps of all of them at once and writes to /tmp/pd/dec_steps how many fit in BUDGET seconds;
# `decoder.sh train SECONDS` trains (resuming) for at most SECONDS and packs each finished VAE into $OUT.
WEIGHTS=${WEIGHTS:-0 0.05 0.2}
run() {  # run OUT STEPS TIME_LIMIT ADV
  python3 -m pocketdiff train teacher --out $1 --vae-from pocketdiff/weights/fashion --unet-from pocketdiff/weights/fashion --data /tmp/pd/data --captions-cache /tmp/pd/data/captions.safetensors --unet-steps 0 --decoder-steps $2 --decoder-lr 2e-4 --decoder-adv-weight $4 --warmup 100 --checkpoint-every 500 --time-limit $3 --json > $1.json 2> $1.err
}
if [ "$1" = probe ]; then
  for w in $WEIGHTS; do run /tmp/probe/dec_$w 101 600 $w & done; wait
  python3 - "$2" $WEIGHTS <<'PY'
import json, sys
per = []
for w in sys.argv[2:]:
    at = {r["step"]: r["elapsed_s"] for r in map(json.loads, open(f"/tmp/probe/.dec_{w}.train/decoder_log.jsonl"))}
    per.append((at[100] - at[50]) / 50)
steps = int(0.95 * float(sys.argv[1]) / max(per))
print("probe: s/step", [round(p, 4) for p in per], "->", steps, "steps in", sys.argv[1], "s")
open("/tmp/pd/dec_steps", "w").write(str(steps))
PY
else
  for w in $WEIGHTS; do run /tmp/pd/dec_$w $(cat /tmp/pd/dec_steps) $2 $w & done; wait
  for w in $WEIGHTS; do
    grep -E '"(finished|decoder_seconds|vae_recon_l1|noisy_l1_0.1)"' /tmp/pd/dec_$w.json | tr -d '\n '; echo " <- $w"; tail -n 2 /tmp/pd/dec_$w.err
    if grep -q '"finished": true' /tmp/pd/dec_$w.json; then
      mkdir -p $OUT/dec_$w && cp /tmp/pd/dec_$w/vae/* /tmp/pd/dec_$w.json /tmp/pd/.dec_$w.train/decoder_log.jsonl $OUT/dec_$w/
    fi
  done
fi
