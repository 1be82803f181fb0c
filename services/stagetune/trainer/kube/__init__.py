"""Training runs as Kubernetes objects: an Indexed Job with one pod per node and a headless Service for
torchrun's c10d rendezvous, on a named GPU profile.

The trainer job decides and drives a run through `launcher.py` (when the chart enables it); `client.py` creates,
follows and removes the objects; the object builders (`objects.py`) are plain functions so they can be rendered
and schema-checked without a cluster.
"""
