# Continue the shipped teacher's U-Net (resuming from /tmp/pd when a checkpoint is there) for $1 s; pack into $OUT.
python3 -m pocketdiff train teacher --out /tmp/pd/fashion --vae-from pocketdiff/weights/fashion --unet-from pocketdiff/weights/fashion --data /tmp/pd/data --captions-cache /tmp/pd/data/captions.safetensors --unet-steps 5600 --unet-lr 2.5e-4 --warmup 100 --checkpoint-every 400 --time-limit $1 --json > /tmp/pd/teacher.json 2>/tmp/pd/teacher.err
grep -E '"(finished|unet_steps_done|unet|latent_scale)"' /tmp/pd/teacher.json; tail -n 3 /tmp/pd/teacher.err
(cd /tmp/pd && tar czf /tmp/pd/out.tgz teacher.json fashion .fashion.train/unet_log.jsonl) && rm -f $OUT/out.tgz.* && split -b 15M /tmp/pd/out.tgz $OUT/out.tgz.
