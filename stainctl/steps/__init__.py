"""Pipeline steps over a workspace: what the CLI commands call.

Each step is idempotent: it does what is missing, skips what was done with the same parameters,
redoes what was made with other ones, and records per-slide outcomes in the manifest.
"""
