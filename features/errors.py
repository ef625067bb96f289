"""The error every plexrec stage raises for a wrong setting (a schema key, a config value, a flag)."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and how to fix it."""
