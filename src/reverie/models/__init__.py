"""Networks: the UNet denoiser, the KL autoencoder and text encoders (diffusers parameter names).

Import the submodules directly (`from reverie.models.unet import UNet`); the text encoder pulls in
transformers, so nothing is imported here eagerly."""
