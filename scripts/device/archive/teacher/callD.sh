# carry .whl .dev/c1 .dev/captions.safetensors
T0=$(date +%s)
. scripts/device_env.sh || exit 4
mkdir -p /tmp/pd/data
xz -dc .dev/c1/train-images-idx3-ubyte.xz > /tmp/pd/data/train-images-idx3-ubyte
cp .dev/c1/train-labels-idx1-ubyte.gz .dev/captions.safetensors /tmp/pd/data/
bash scripts/gpu_teacher/probe.sh 2048 $(( ${BUDGET:-1000} - ($(date +%s) - T0) )) || exit 5
bash scripts/gpu_teacher/train3.sh $(( 545 - ($(date +%s) - T0) ))
