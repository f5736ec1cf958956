"""Typed configuration of a Sluice run (see `config.schema`) and how recipes load it."""

from config.errors import UserError
from config.loader import load_config
from config.schema import SluiceConfig

__all__ = ["SluiceConfig", "UserError", "load_config"]
