# carry .whl .dev/c1 .dev/captions.safetensors
# v6 decoder, call 1 of 4: stage the data, size the decoder fine-tunes to ~BUDGET s over this call and
# callK (decoder.sh probe), then train them.
T0=$(date +%s)
. scripts/device_env.sh || exit 4
mkdir -p /tmp/pd/data /tmp/probe
xz -dc .dev/c1/train-images-idx3-ubyte.xz > /tmp/pd/data/train-images-idx3-ubyte
cp .dev/c1/train-labels-idx1-ubyte.gz .dev/captions.safetensors /tmp/pd/data/
bash scripts/gpu_teacher/decoder.sh probe $(( ${BUDGET:-850} - ($(date +%s) - T0) )) || exit 5
bash scripts/gpu_teacher/decoder.sh train $(( 530 - ($(date +%s) - T0) ))
