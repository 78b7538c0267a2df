"""The one exception type for mistakes a user can fix: the trainer prints its message and exits with status 2."""


class UserError(Exception):
    """A bad flag, folder, file or model: the message says what is wrong, where, and what to do."""


USAGE_EXIT_CODE = 2
