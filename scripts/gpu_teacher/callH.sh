# carry .dev/c2b .dev/c2t
export LR=2e-4 WARMUP=100
T0=$(date +%s)
test -f /tmp/pd/steps || { echo "COLD MACHINE: /tmp/pd is gone"; exit 3; }
. scripts/device_env.sh || exit 4
cp .dev/c2b/inc.part.aa /tmp/pd/
cp .dev/c2t/t10k-* /tmp/pd/data/
bash scripts/gpu_teacher/train3.sh $(( 420 - ($(date +%s) - T0) ))
