"""The base of every error a user can fix (bad input, missing file, wrong setting).

The CLI prints these as one clear line and exits 2; anything else is a bug and keeps its
traceback.
"""


class LLBEdgeError(Exception):
    """An error caused by input or settings the user can change; its message says how."""
