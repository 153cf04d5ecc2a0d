"""The one exception type a user sees as a single error line (no traceback)."""


class MerError(Exception):
    """A problem with the user's input or configuration, reported as one line.

    Messages name the file, the split and the clip where they apply, e.g.
    ``features.pkl: train/1001_DFA_ANG_XX: mfcc has 0 frames``.
    """


class DataError(MerError):
    """A feature file that cannot be used as it is."""


class ConfigError(MerError):
    """A configuration value that is not one of the allowed ones."""


def one_line(error: BaseException | str, limit: int = 200) -> str:
    """An error's text as one line (whitespace collapsed) of at most ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
