# carry .dev/c2b
T0=$(date +%s)
test -f /tmp/pd/data/captions.safetensors || { echo "COLD MACHINE: /tmp/pd is gone"; exit 3; }
. scripts/device_env.sh || exit 4
cp .dev/c2b/inc.part.aa /tmp/pd/
bash scripts/gpu_teacher/train2.sh $(( 480 - ($(date +%s) - T0) ))
