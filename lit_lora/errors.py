"""The one exception type for mistakes a user can fix (bad paths, bad files, bad flags).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input. The message names the problem and, where possible, the fix."""
