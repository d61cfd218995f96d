# v6 table fill-in (2026-11-26, after callM ran out of budget): the 9 baseline-table cells callM did not reach.
# Staged first as callJ/callK/callL do (wheels + train data; test data + inc.part.aa; inc.part.ab + evalcaptions),
# then this file's two runs, one device call each (TABLE=dpm, then TABLE=euler). --samples/--sweep-samples only
# shrink the preamble (headline and sweep are not used from these runs); the cells are 10,000 samples at g=4.
test -f /tmp/pd/inception_fp16.pt || { echo "COLD MACHINE: /tmp/pd is gone"; exit 3; }
. scripts/device_env.sh || exit 4
export POCKETDIFF_CACHE=/tmp/pdcache POCKETDIFF_INCEPTION=/tmp/pd/inception_fp16.pt
case $TABLE in
  dpm) SCHED="--schedulers dpmsolver++ --steps 8 25 50" ;;
  euler) SCHED="--schedulers euler --steps 1 2 4 8 25 50" ;;
  *) echo "TABLE=dpm or TABLE=euler"; exit 2 ;;
esac
timeout 560 python3 bench/teacher_quality.py --model pocketdiff/weights/fashion --captions-cache /tmp/pd/evalcaptions.safetensors --data /tmp/pd/data --reference-samples 10000 --out $OUT/$TABLE --samples 1000 --sweep-samples 500 --guidance 4 --table-samples 10000 $SCHED --unet-dtype fp16 2>&1 | grep -v Warn | tee $OUT/$TABLE/log.txt | grep -E "^(table|floor|headline)"
