"""How every command line of nanodist ends: one line, never a traceback.

    cli.run(main, argv)   main(argv) -> exit code, guarded:
        UserError             "error: <what is wrong and how to fix it>", exit 2
        the reader went away  (`... --json | head`): quiet, exit 141 as a shell tool's SIGPIPE
        Ctrl-C                "interrupted", exit 130
        anything else         "error: unexpected <Type> at <file:line> (<message>); rerun with
                              --debug for the traceback", exit 1: a bug of nanodist's or an
                              input no check foresaw, named where it happened

`--debug` (anywhere on the command line) or NANODIST_DEBUG=1 lets the unexpected ones
through with their traceback; the tests set NANODIST_DEBUG=1, so no bug hides from them.
Under torchrun a UserError (the same on every rank) is printed by rank 0 only; an
unexpected error by the rank that met it.
"""
import argparse
import os
import sys
import traceback
from pathlib import Path

from nanodist.errors import UserError

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent  # the checkout (or site-packages, when installed)
DEBUG_HELP = "--debug: show the traceback of an unexpected error (or NANODIST_DEBUG=1)"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one UserError line naming --help (exit code 2)."""

    def __init__(self, **kwargs):
        super().__init__(epilog=kwargs.pop("epilog", DEBUG_HELP), **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def _say(line: str):
    print(line, file=sys.stderr, flush=True)


def _ours(path: Path) -> bool:
    """A file of nanodist's: the package, or the checkout's scripts (not its installed libraries)."""
    return path.is_relative_to(PACKAGE) or (path.is_relative_to(ROOT) and not
                                            {"site-packages", "dist-packages"} & set(path.parts))


def where(error: BaseException) -> str:
    """file:line of the innermost frame of our code that `error` passed through (the
    innermost frame of all when none is ours)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if _ours(Path(f.filename).resolve())]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "an unknown place"
    path = Path(frame.filename).resolve()
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{frame.lineno}"


def unexpected(error: BaseException) -> str:
    """The one line of an error no check foresaw."""
    message = str(error).strip().splitlines()
    detail = f" ({message[0][:300]})" if message else ""
    rank = os.environ.get("RANK")
    prefix = f"rank {rank}: " if rank and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    return (f"error: {prefix}unexpected {type(error).__name__} at {where(error)}{detail}; rerun with "
            f"--debug for the traceback, and report it if the inputs were right")


def run(main, argv=None) -> int:
    """main(argv) (argv without --debug), every way it can end turned into one line and an
    exit code (see the module doc)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("NANODIST_DEBUG") == "1"
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        code = main(argv)
        sys.stdout.flush()  # here, not at exit: a reader gone by then is a broken pipe too
        return code
    except UserError as error:
        if os.environ.get("RANK", "0") == "0":  # every rank has the same one: say it once
            _say(f"error: {error}")
        return 2
    except BrokenPipeError:
        # stdout's reader stopped reading: say nothing more (not even at exit's flush)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as error:  # noqa: BLE001 - the one place that turns the unforeseen into a line
        if debug:
            raise
        _say(unexpected(error))
        return 1
