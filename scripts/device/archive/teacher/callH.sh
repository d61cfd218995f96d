# carry .dev/c2b .dev/c2t
# v5, second call: callE with v5's settings and a shorter call.
LR=2e-4 WARMUP=100 CALL_S=420 exec bash scripts/gpu_teacher/callE.sh
