# carry .whl .dev/c1 .dev/captions.safetensors
# v5 (continues the shipped v4): callD with peak lr 2e-4, warm-up 100, ~760 s of training over two calls.
LR=2e-4 WARMUP=100 BUDGET=820 exec bash scripts/gpu_teacher/callD.sh
