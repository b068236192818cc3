"""The one base class of the errors a user causes and can fix (a bad config, file or argument).

The CLI prints these, and OSError, as one line and exits 2; any other exception is a bug in
hammer and keeps its traceback.
"""


class HammerError(ValueError):
    """Bad input, raised where it enters, with the bad value and what was expected."""
