"""Model families (SD3 now, Sana next): loaders, encoders, fingerprints and tiny test models.

Importing this package is cheap; torch and diffusers load only when a model is built or loaded.
"""
