"""The persistent job queue: states, claiming with leases, retry policy."""
