"""What every command line here shares: one argparse setup, one-line errors with exit code 2, checks of
output paths before any work, and the speed flags (--amp, --compile, --channels_last)."""
import argparse
import copy
import os
import sys

from fileio import WriteError

AMP_MODES = ("auto", "none", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class UserError(Exception):
    """Bad input: reported as one line with exit code 2. CheckpointError and DataError are kinds of it."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and lists every flag's default, also for flags without help."""

    def _format_action(self, action):
        if action.option_strings and not action.help and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"  # argparse leaves flags without help bare
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every script here uses it: each default in --help, no abbreviated flags (--max_step is
    not --max_steps), and a bad command line reported as one line with exit code 2."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def float_list(text: str) -> tuple:
    """A comma-separated flag value as a tuple of floats."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers expected, got {text!r}") from None


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def guarded(main):
    """Run a CLI main(); bad input of any kind, missing data and unwritable outputs become one line on
    stderr and exit code 2."""
    def wrapper(argv=None):
        try:
            return main(argv)
        except (UserError, WriteError) as e:
            fail(str(e))
    return wrapper


def replaced(args: argparse.Namespace, **changes) -> argparse.Namespace:
    """A copy of `args` with some values changed: parsed flags are never modified in place."""
    return argparse.Namespace(**{**vars(args), **changes})


def check_output_dir(path: str, flag: str, create: bool = False) -> None:
    """Refuse, before any work, a folder to write into that is a file or cannot be made."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot create it ({e.strerror})") from None


def check_output_file(path: str, flag: str) -> None:
    """Refuse, before any work, a file to write that is a folder or sits under a file."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")


def add_speed_args(p: argparse.ArgumentParser, what: str) -> None:
    """--amp, --compile and --channels_last, shared by training, sampling and bench.py."""
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="autocast dtype; auto = bf16 on CUDA and on CPUs with AVX-512 BF16 or AMX, fp32 elsewhere "
                        "(fp16 is CUDA-only)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help=f"torch.compile {what}; MODE is one of {', '.join(COMPILE_MODES)} (default when given "
                        "bare; reduce-overhead adds CUDA graphs)")
    p.add_argument("--channels_last", action="store_true",
                   help="NHWC weights and activations (cuDNN's tensor-core layout; no gain on the CPUs measured)")
