"""stagetune: diffusion fine-tuning as a pipeline of gRPC services over a content-addressed store."""

__version__ = "0.1.0"
