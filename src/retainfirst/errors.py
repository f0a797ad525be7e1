"""User-facing errors: one line that says what to fix. The CLI prints them without a traceback."""


class RetainFirstError(ValueError):
    """Bad input or a failed precondition that the user can fix (missing file, wrong schema, ...)."""


class NonFiniteError(RetainFirstError):
    """A loss or gradient became NaN/inf; the run stops and keeps its last good checkpoint."""
