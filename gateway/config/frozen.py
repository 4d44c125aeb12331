"""The base of every configuration model: frozen, and unknown keys are errors (a typo fails at
start-up with its key path instead of being ignored)."""

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
