"""The embeddings path: encode texts with a 4-bit model through a shared cache, then train classifier heads."""
