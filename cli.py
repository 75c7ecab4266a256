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


def choose(only: str | None, known, what: str) -> list:
    """The names an --only flag picks from `known`: all when not given, none for "none"."""
    names = [] if only == "none" else only.split(",") if only else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def flags_table(parser: argparse.ArgumentParser) -> str:
    """A Markdown table of a parser's flags, defaults and help, in --help's order."""
    rows = ["| flag | default | what |", "|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue
        default = "" if action.default is None or action.default is False else f"`{action.default}`"
        names = ", ".join(f"`{name}`" for name in action.option_strings)
        choices = f" ({', '.join(map(str, action.choices))})" if action.choices else ""
        rows.append(f"| {names} | {default} | {(action.help or '').replace('|', '/')}{choices} |")
    return "\n".join(rows)


def flags_reference() -> str:
    """docs/flags.md: every flag of the four scripts, from their own parsers (`python cli.py` rewrites it)."""
    import config
    import eval as eval_script
    import inference
    parts = ["# Flags", "", "Generated from the scripts' parsers by `python cli.py`; a test checks that it is current.", ""]
    for title, parser in (("train.py", config.build_parser(False)),
                          ("train_conditional.py (the flags of train.py, and these)", config.build_parser(True)),
                          ("inference.py", inference.build_parser()), ("eval.py", eval_script.build_parser())):
        if title.startswith("train_conditional"):
            conditioning = next(g for g in parser._action_groups if g.title == "conditioning")
            parser = argparse.ArgumentParser(add_help=False)
            parser._actions = conditioning._group_actions
        parts += [f"## {title}", "", flags_table(parser), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    from fileio import write_text
    write_text(os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "flags.md"), flags_reference())
    print("wrote docs/flags.md")
