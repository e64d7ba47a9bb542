"""One error type for bad user input: the entry points print its message as one paragraph, no traceback."""


class ConfigError(ValueError):
    """Bad configuration or input. The message names the key or file and what would be valid."""
