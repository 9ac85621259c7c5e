"""The one exception type the library raises for problems a user can fix."""


class MlxGptError(Exception):
    """A problem with the user's input, files or environment.

    The message names the thing that is wrong and how to fix it, on one line; the
    command-line scripts print it as ``error: <message>`` and exit non-zero.
    """
