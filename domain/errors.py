"""The one domain error: a rule of the contract's event table was broken."""


class RuleBroken(Exception):
    """`rule` is a stable snake_case name; the message is for people."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message
