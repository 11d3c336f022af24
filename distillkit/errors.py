"""User-facing errors: the CLI prints their message, without a traceback, and exits 2."""


class DistillError(Exception):
    """A problem with the user's config, files or run dir, explained in the message."""
