"""Training tenant deltas on the shared base: `flockserve adapter train` and the jobs trainer."""
