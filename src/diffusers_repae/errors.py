"""The library's exception for a mistake in what the user asked for.

It is a ``ValueError`` (so callers that catch ``ValueError`` keep working); ``diffusers_repae.cli.run_cli`` prints
it, like every ``ValueError``, as one ``error: ...`` line with exit status 2.
"""


class UserError(ValueError):
    """A mistake in what the user asked for; the message says what is wrong and what to do."""
