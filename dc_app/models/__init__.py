"""DynamiCrafter's model parts, one module each: unet, attention, autoencoder, resampler, clip, diffusion."""
