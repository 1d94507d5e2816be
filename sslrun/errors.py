"""The one exception type users see: a cause and a fix, no traceback."""


class SslrunError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The CLI prints the message as one paragraph and exits non-zero; code raising it should name
    what was wrong (the key, the path, the value) and what to do about it.
    """
