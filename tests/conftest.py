"""Shared test settings."""

import os

# Tests run on CPU; keep XLA from grabbing every core for its own thread pool twice over.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
