"""Runnable examples of compressjax (run from the repository root: ``python examples/<name>.py``)."""
