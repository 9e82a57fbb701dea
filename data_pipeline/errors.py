"""The one exception type of the data pipeline: its message always names the file and the value."""


class DataPipelineError(ValueError):
    """A user-facing error: bad input file, corrupt index, invalid argument. The CLI prints it without a
    traceback and exits with status 2."""
