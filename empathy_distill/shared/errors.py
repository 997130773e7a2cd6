"""One error type for problems the user can fix: the CLI prints it as one line, no traceback."""


class PipelineError(Exception):
    """A readable, final problem with the input, the config or an output folder.

    The message should say what is wrong and what to do about it.
    """
