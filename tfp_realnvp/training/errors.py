"""`RunError`: a run that cannot go on as asked, with what to do. The launcher prints it without a
traceback."""


class RunError(ValueError):
  """A run that cannot go on as asked (workdir, checkpoint or flags), with what to do."""
