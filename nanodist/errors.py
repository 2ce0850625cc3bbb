"""The one exception every layer may raise: bad flags or inputs, said in one line.

`train.py`, `sample.py` and the tools print it as `error: <message>` and exit 2 (on every
rank, never a traceback): the message says what is wrong and how to fix it.
"""


class UserError(Exception):
    """Bad flags or inputs. The message says what is wrong and how to fix it."""
