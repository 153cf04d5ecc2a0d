"""mer-cli: train and compare multimodal emotion recognition models from Hydra configs."""

__version__ = "0.1.0"
