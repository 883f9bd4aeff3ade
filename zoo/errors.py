"""Errors a user can cause. The CLI turns each into one `error: ...` line and exit status 2."""


class ZooError(Exception):
    """Bad input: unknown name, bad config value, missing file. The message names what is valid."""


class ConfigError(ZooError, ValueError):
    """An unknown config key, a value of the wrong type, or an unknown choice."""


class UnavailableError(ZooError, RuntimeError):
    """A requested implementation that cannot run here (no GPU, no C++ compiler): the message says why."""


class DataError(ZooError, ValueError):
    """An unknown data source, a missing file, or data of the wrong shape."""


def unknown(what: str, name: str, valid) -> str:
    """'unknown model 'x'; valid: a, b, c' -- the one message format for bad names."""
    return f"unknown {what} {name!r}; valid: {', '.join(sorted(valid))}"
