"""What every command line here shares: one argparse setup, one-line errors with exit code 2, flags declared
on the dataclass fields they set, checks of output paths before any work, and the speed flags (--amp,
--compile, --channels_last)."""
import argparse
import copy
import dataclasses
import os
import sys
import types
import typing

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


def int_list(text: str) -> tuple:
    """A comma-separated flag value as a tuple of integers."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None


def flag(default, help: str, choices=None, metavar: str | None = None, aliases: tuple = ()):
    """A dataclass field that is also a command-line flag: its default, help, choices and metavar are
    written here, once, beside the field they set (add_fields turns them into flags)."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, metavar=metavar,
                                                            aliases=aliases))


def flag_value(value) -> str:
    """A value as it is typed on the command line (and shown in --help): tuples comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_fields(group, config_class, only=None, prefix: str = "", defaults: dict | None = None,
               unset: bool = False) -> None:
    """One flag --PREFIXNAME for each field of `config_class` declared with flag() (or each of `only`), with
    its type, help, choices and metavar; its default is the field's unless `defaults` names another, or None
    for every flag when `unset` (the value then comes from elsewhere, a checkpoint's say). A field declared
    without flag() is a fixed setting: it joins the parsed arguments with its default, and no flag sets it."""
    for f in dataclasses.fields(config_class):
        if "help" not in f.metadata:
            group.set_defaults(**{prefix + f.name: f.default})
        if "help" not in f.metadata or (only is not None and f.name not in only):
            continue
        kind = f.type
        if isinstance(kind, types.UnionType):  # X | None -> X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        is_list = typing.get_origin(kind) is tuple
        default = None if unset else (defaults or {}).get(f.name, f.default)
        if is_list and default is not None:
            default = flag_value(default)  # parsed as if typed
        names = [f"--{prefix}{f.name}", *f.metadata["aliases"]]
        if kind is bool:
            group.add_argument(*names, dest=prefix + f.name, default=default, help=f.metadata["help"],
                               action="store_true")
            continue
        group.add_argument(*names, dest=prefix + f.name, default=default, help=f.metadata["help"],
                           type={int: int_list, float: float_list}[typing.get_args(kind)[0]] if is_list else kind,
                           choices=f.metadata["choices"], metavar=f.metadata["metavar"])


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
