"""Typed errors that gemjax raises for bad user input.

Every error names what was wrong and where (a config key, a file path, a record
index) so the message alone is enough to fix the problem. This module imports
nothing from gemjax, so every room may import it.
"""

from __future__ import annotations


class GemjaxError(Exception):
  """Base class of every error gemjax raises on purpose."""


class ConfigError(GemjaxError, ValueError):
  """A config key, value or combination is invalid. The message names the key."""


class CheckpointError(GemjaxError):
  """A checkpoint is missing, partial, or does not match the model."""


class BadInputError(GemjaxError, ValueError):
  """A record or media file could not be turned into tokens.

  Attributes:
    modality: 'text', 'image', 'audio', 'video' or 'record'.
    source: where the input came from (path, shard:index, or a description).
    reason: what was wrong, in words.
  """

  def __init__(self, modality: str, source: str, reason: str):
    self.modality = modality
    self.source = source
    self.reason = reason
    super().__init__(f'bad {modality} input from {source}: {reason}')

  def __reduce__(self):  # picklable across Grain worker processes
    return (type(self), (self.modality, self.source, self.reason))
