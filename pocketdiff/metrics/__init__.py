"""Quality yardsticks: FID/KID, prompt accuracy, and agreement (PSNR/SSIM) with a reference."""
