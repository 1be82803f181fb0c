"""The vae stage."""
