"""NVLabs Sana: component loaders, text and latent encoders, options and the tiny test model.

Import the submodules you need; this package imports nothing heavy, as config checks consult the family.
"""
