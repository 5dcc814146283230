"""mae-bench: Masked Autoencoders and contrastive baselines on one ViT, compared fairly."""

__version__ = "0.1.0"
