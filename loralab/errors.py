"""The one exception type for bad user input.

Anything the user can fix (an unknown model, a target that matches nothing, rank 0, a missing or
corrupt file, a malformed config) raises `UserError` with a one-line message that names the
problem and the fix. The CLI prints it to stderr and exits with code 2, with no traceback.
"""


class UserError(Exception):
    """Bad input the user can fix; the message is one line: the problem, then the fix."""


class ConfigError(UserError):
    """A config value the user can fix, naming the config key (`key`, a `TrainConfig` field),
    so a study file can point at the line that set it (`file:line: message`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
