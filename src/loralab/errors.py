"""The one user-facing error type.

Every problem a user can fix (a bad config key, a broken image, an unknown model layout) is raised as
`LoralabError` with a message that says what was wrong, where (file, key) and what to do. The CLI prints
the message without a traceback (`--debug` shows one).
"""


class LoralabError(Exception):
    """A problem the user can fix; the message says what, where and what to do."""
