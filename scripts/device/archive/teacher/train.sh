# Resume (or start) the U-Net for $1 seconds, then pack what exists into $OUT.
python3 -m pocketdiff train teacher --out /tmp/pd/fashion --vae-from /tmp/pd/sweep/$(cat /tmp/pd/BEST) --data /tmp/pd/data --captions-cache /tmp/pd/data/captions.safetensors --unet-steps 7200 --warmup 300 --checkpoint-every 400 --time-limit $1 --json > /tmp/pd/teacher.json 2>/tmp/pd/teacher.err
grep -E '"(finished|unet_steps_done|unet|vae_recon_l1|posterior_std_scaled|noisy_l1_0.1|noisy_l1_0.2|latent_scale)"' /tmp/pd/teacher.json; tail -n 3 /tmp/pd/teacher.err
(cd /tmp/pd && tar czf /tmp/pd/out.tgz sweep/*/result.json teacher.json fashion .fashion.train/unet_log.jsonl $(ls classifier.* 2>/dev/null)) && split -b 15M /tmp/pd/out.tgz $OUT/out.tgz.
