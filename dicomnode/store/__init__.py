"""Durable files: received instances and result objects."""
