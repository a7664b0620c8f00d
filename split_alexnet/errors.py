"""The errors the core raises on bad input; the launchers (cli.py) turn them into one line and exit status 2."""


class UsageError(Exception):
    """Bad input: the launchers print its one-line message and exit with status 2."""


class RankError(UsageError):
    """Bad input found by one rank alone (no collective to share it): printed by the rank that raised it."""
