"""distillkit: distil diffusion models into few-step generators and classifiers into smaller ones."""

__version__ = "0.1.0"
