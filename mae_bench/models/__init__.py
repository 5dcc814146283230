"""Models (core layer): the ViT and its presets, attention kernels, masking, and MAE's
``MaskedAutoencoder`` (a drop-in for the official ``models_mae.MaskedAutoencoderViT``)."""
