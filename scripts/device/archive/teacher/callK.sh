# carry .dev/c2b .dev/c2t
# v6 decoder, call 2 of 4: finish the decoder fine-tunes (packing each finished VAE into $OUT) and stage
# the test set and the first Inception part for callL.
T0=$(date +%s)
test -f /tmp/pd/dec_steps || { echo "COLD MACHINE: /tmp/pd is gone"; exit 3; }
. scripts/device_env.sh || exit 4
cp .dev/c2b/inc.part.aa /tmp/pd/
cp .dev/c2t/t10k-* /tmp/pd/data/
bash scripts/gpu_teacher/decoder.sh train $(( ${CALL_S:-520} - ($(date +%s) - T0) ))
