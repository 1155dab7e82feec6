"""Pipeline steps over a workspace: what the CLI commands call.

Each step is idempotent: it does what is missing, skips what was done with the same parameters,
redoes what was made with other ones, and records per-slide outcomes in the manifest.
"""

# The main jobs' (translate SLIDES, normalize) tissue threshold, below `tile`'s default: an edge
# tile with a little tissue is still made, so the virtual slide covers the whole section.
MAIN_JOB_MIN_TISSUE = 0.05
