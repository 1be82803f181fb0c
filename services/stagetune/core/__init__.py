"""Code every service shares: config, store, caches, jobs, gRPC plumbing, metrics."""
