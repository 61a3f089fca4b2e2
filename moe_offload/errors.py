"""The one exception users see.

Every user-facing failure (a missing file, a bad field, a value out of range) raises
``MoeOffloadError`` with a single line that names the file, field or value and says what to do.
The CLI prints that line and exits non-zero; internal invariants use ``assert`` instead.
"""


class MoeOffloadError(Exception):
    """A problem with the user's input or environment, explained in one line."""
