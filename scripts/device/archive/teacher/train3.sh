# v4/v5: continue the shipped U-Net at batch 2048, peak lr $LR (default 4e-4, v4's), for the step count
# probe.sh chose, for at most $1 s this call (resuming from /tmp/pd when a checkpoint is there); pack into $OUT.
python3 -m pocketdiff train teacher --out /tmp/pd/fashion --vae-from pocketdiff/weights/fashion --unet-from pocketdiff/weights/fashion --data /tmp/pd/data --captions-cache /tmp/pd/data/captions.safetensors --unet-steps $(cat /tmp/pd/steps) --unet-batch 2048 --unet-lr ${LR:-4e-4} --warmup ${WARMUP:-200} --checkpoint-every 250 --time-limit $1 --json > /tmp/pd/teacher.json 2>/tmp/pd/teacher.err
grep -E '"(finished|unet_steps_done|unet|latent_scale)"' /tmp/pd/teacher.json; tail -n 3 /tmp/pd/teacher.err
(cd /tmp/pd && tar czf /tmp/pd/out.tgz teacher.json fashion .fashion.train/unet_log.jsonl) && rm -f $OUT/out.tgz.* && split -b 15M /tmp/pd/out.tgz $OUT/out.tgz.
