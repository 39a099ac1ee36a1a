"""The one exception type for mistakes a user can make (config, data, checkpoint, CLI).

Entry points catch it and print its message alone, without a traceback: the message itself must
say what was wrong, where, and how to fix it.
"""


class UserError(Exception):
    """A mistake in what the user asked for; the message is shown to them as is."""
