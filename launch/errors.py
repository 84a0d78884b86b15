"""The one exception type the ``mie`` command reports as a one-line error instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, files, data), stated in one line: where and why.

    Stages raise subclasses of it; ``mie`` prints ``mie: error: <message>`` and exits with code 2."""
