# carry .dev/c3
# v6 decoder, call 3 of 4: for each fine-tuned decoder and the shipped one, the autoencoder floor and the
# headline figure (DDIM 50, guidance 4, 10,000 samples), with bench/teacher_quality.py and no table.
test -f /tmp/pd/inc.part.aa || { echo "COLD MACHINE: /tmp/pd is gone"; exit 3; }
. scripts/device_env.sh || exit 4
cat /tmp/pd/inc.part.aa .dev/c3/inc.part.ab > /tmp/pd/inception_fp16.pt
cp .dev/c3/evalcaptions.safetensors /tmp/pd/
export POCKETDIFF_CACHE=/tmp/pdcache POCKETDIFF_INCEPTION=/tmp/pd/inception_fp16.pt
for m in pocketdiff/weights/fashion /tmp/pd/dec_*[0-9]; do
  name=$(basename $m)
  timeout 200 python3 bench/teacher_quality.py --model $m --captions-cache /tmp/pd/evalcaptions.safetensors --data /tmp/pd/data --reference-samples 10000 --out $OUT/$name --samples 10000 --guidance 4 --sweep-samples 1000 --steps --unet-dtype fp16 2>&1 | grep -E "^(floor|headline)" | cut -c1-400
done
