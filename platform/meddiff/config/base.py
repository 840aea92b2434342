"""The base class of every configuration section."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A frozen config section in which an unknown key is an error, not a silent default.

    Workers receive ``cfg.model_dump()`` and re-validate it, so sections must hold plain data only
    (numbers, strings, lists, nested sections), never live objects.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
