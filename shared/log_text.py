"""Text someone else supplied (a caller's uid or key_id, a key in a config file), made fit for one log or
error line: bounded, and with control, format (bidi overrides such as U+202E) and separator characters
escaped, so it can neither break the line nor disguise what surrounds it."""

# Enough to recognise any legitimate value: uids are short, KeySealer key_ids are under 60 characters.
MAX_LOGGED_CHARS = 64


def printable(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """`text` cut to `limit` characters (the cut noted with the full length), each character that does not
    print shown as a Python escape (\\n, \\x1b, \\u202e)."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[:limit])
    return shown if len(text) <= limit else f"{shown}...({len(text)} characters)"
