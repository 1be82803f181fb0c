"""The trainer stage."""
