"""The one error type that medanomaly lets reach a user."""


class MedanomalyError(Exception):
    """A problem with the user's input or setup.

    The message names the file or option at fault and says how to fix it; the CLI prints it
    as one paragraph and exits with code 2, without a traceback.
    """
