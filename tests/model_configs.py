"""Model configs for tests that build the model directly, without a run config."""

from configs import default
from models import ModelConfig


def model_config(**fields) -> ModelConfig:
  """The default config's model group with ``fields`` changed (its -1 sizes must be given)."""
  return ModelConfig(**{**default.get_config().model.to_dict(), **fields})
