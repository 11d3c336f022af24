"""User-facing errors: the CLI prints their message, without a traceback, and exits 2."""


class DistillError(Exception):
    """A problem with the user's config, files or run dir, explained in the message."""


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (Hydra's instantiate and OmegaConf wrap the one that
    explains the problem)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return e
