"""Training runs as Kubernetes objects: an Indexed Job with one pod per node and a headless Service for
torchrun's c10d rendezvous, on a named GPU profile.

Not wired into the trainer service yet. The entry point is `client.run_training_job`; the object builders
(`objects.py`) are plain functions so they can be rendered and schema-checked without a cluster.
"""
