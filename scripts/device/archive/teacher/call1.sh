# GPU call 1 (carry .whl .dev/c1 .dev/captions.safetensors): VAE KL sweep, then the U-Net on the best VAE.
T0=$(date +%s)
. scripts/device_env.sh
mkdir -p /tmp/pd/data
xz -dc .dev/c1/train-images-idx3-ubyte.xz > /tmp/pd/data/train-images-idx3-ubyte
cp .dev/c1/train-labels-idx1-ubyte.gz .dev/captions.safetensors /tmp/pd/data/
for w in 1e-4 1e-3 1e-2; do
  python3 bench/vae_kl_sweep.py --out /tmp/pd/sweep --kl-weight $w --data /tmp/pd/data --steps 2000 > /tmp/pd/sweep_$w.log 2>&1 &
done
wait
tail -n 2 /tmp/pd/sweep_*.log
BEST=$(python3 -c "
import json,glob
r=[json.load(open(f)) for f in glob.glob('/tmp/pd/sweep/*/result.json')]
b=min(r,key=lambda x:x['noisy_l1_0.1']); print('kl_%g'%b['kl_weight'])")
echo BEST=$BEST; echo $BEST > /tmp/pd/BEST
bash scripts/gpu_teacher/train.sh $(( 540 - ($(date +%s) - T0) ))
