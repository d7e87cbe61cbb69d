"""Errors a user can fix. Their text is what the user sees in a failed prediction: name the input and say
what to do."""


class UserError(ValueError):
    """A request that cannot be served as given. `field` names the input at fault (or None)."""

    def __init__(self, field: str | None, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)
