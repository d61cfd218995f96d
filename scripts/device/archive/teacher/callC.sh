# carry .dev/c3 .dev/c2t
test -f /tmp/pd/inc.part.aa || { echo "COLD MACHINE: /tmp/pd is gone"; exit 3; }
. scripts/device_env.sh || exit 4
cat /tmp/pd/inc.part.aa .dev/c3/inc.part.ab > /tmp/pd/inception_fp16.pt
cp .dev/c2t/t10k-* /tmp/pd/data/
export POCKETDIFF_CACHE=/tmp/pdcache POCKETDIFF_INCEPTION=/tmp/pd/inception_fp16.pt
python3 bench/teacher_quality.py --model /tmp/pd/fashion --captions-cache .dev/c3/evalcaptions.safetensors --data /tmp/pd/data --reference-samples 10000 --out $OUT --samples 10000 --table-samples 2000 --sweep-samples 1000 --guidance 2 4 7.5 2>&1 | grep -v Warn | tail -30
