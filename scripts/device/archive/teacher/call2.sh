# GPU call 2 (carry .dev/c2): classifier (beside), U-Net resumed; keeps Inception part a in /tmp.
T0=$(date +%s)
test -f /tmp/pd/BEST || { echo "COLD MACHINE: /tmp/pd is gone"; exit 3; }
. scripts/device_env.sh
cp .dev/c2/t10k-* /tmp/pd/data/ && cp .dev/c2/inc.part.aa /tmp/pd/
python3 -m pocketdiff train classifier --out /tmp/pd/classifier.safetensors --data /tmp/pd/data --json > /tmp/pd/classifier.json 2>/tmp/pd/classifier.err &
bash scripts/gpu_teacher/train.sh $(( 520 - ($(date +%s) - T0) ))
wait; cat /tmp/pd/classifier.json; tail -n 2 /tmp/pd/classifier.err
(cd /tmp/pd && tar czf /tmp/pd/out.tgz sweep/*/result.json teacher.json fashion .fashion.train/unet_log.jsonl classifier.*) && rm -f $OUT/out.tgz.* && split -b 15M /tmp/pd/out.tgz $OUT/out.tgz.
