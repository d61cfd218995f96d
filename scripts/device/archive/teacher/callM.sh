# v6 decoder, call 4 of 4 (nothing carried): the full bench/teacher_quality.py run (as callI) on the
# pipeline with the decoder DEC (e.g. dec_0.05) that callL measured best.
test -f /tmp/pd/inception_fp16.pt || { echo "COLD MACHINE: /tmp/pd is gone"; exit 3; }
. scripts/device_env.sh || exit 4
export POCKETDIFF_CACHE=/tmp/pdcache POCKETDIFF_INCEPTION=/tmp/pd/inception_fp16.pt
timeout 570 python3 bench/teacher_quality.py --model /tmp/pd/$DEC --captions-cache /tmp/pd/evalcaptions.safetensors --data /tmp/pd/data --reference-samples 10000 --out $OUT --samples 10000 --table-samples 10000 --sweep-samples 2000 --guidance 3 4 5 --unet-dtype fp16 2>&1 | grep -v Warn | tail -40
