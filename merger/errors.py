"""The one base class of every error a user can cause (bad input, bad files).

The CLI prints these as one line and exits non-zero; the service answers them
with HTTP 4xx. Anything else is a bug and keeps its traceback.
"""


class D2LoraError(ValueError):
    """A problem with the user's input, named in the message."""
