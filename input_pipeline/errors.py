"""The input pipeline's errors for bad user input: each names the config key or path at fault.

``DataError`` (a ValueError) and ``DataNotFoundError`` (also a FileNotFoundError) mean the data
a user pointed at cannot be used as given; the trainer reports them in one line (exit code 2).
Any other exception from the pipeline is a bug and keeps its traceback.
"""

from input_pipeline.host.command import LoomError


class DataError(LoomError, ValueError):
  """A data source, tokenizer or store a user named cannot be used; the message says why."""


class DataNotFoundError(DataError, FileNotFoundError):
  """A path a user named (a corpus, a tokenizer model) does not exist."""


class StoreError(DataError):
  """A prepared store on disk is incomplete, corrupt or not the one asked for."""
