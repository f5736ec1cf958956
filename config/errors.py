"""The one exception type for mistakes a user can fix.

Anything raised as `UserError` reaches the command line as a single line on stderr and exit
code 2, never as a traceback. Code deep inside actors raises it too: Ray re-raises an actor's
exception in the driver as a subclass of the original type, so `except UserError` still works.
"""


class UserError(Exception):
    """Bad input: a config field, a data file, a reward function. The message names the fix."""
