"""Training: one trainer for the VAE and the latent interpolation denoiser."""
