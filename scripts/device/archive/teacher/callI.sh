# carry .dev/c3
test -f /tmp/pd/inc.part.aa || { echo "COLD MACHINE: /tmp/pd is gone"; exit 3; }
. scripts/device_env.sh || exit 4
cat /tmp/pd/inc.part.aa .dev/c3/inc.part.ab > /tmp/pd/inception_fp16.pt
export POCKETDIFF_CACHE=/tmp/pdcache POCKETDIFF_INCEPTION=/tmp/pd/inception_fp16.pt
timeout 570 python3 bench/teacher_quality.py --model /tmp/pd/fashion --captions-cache .dev/c3/evalcaptions.safetensors --data /tmp/pd/data --reference-samples 10000 --out $OUT --samples 10000 --table-samples 10000 --sweep-samples 2000 --guidance 3 4 5 --unet-dtype fp16 2>&1 | grep -v Warn | tail -40
