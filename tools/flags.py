"""docs/flags.md: every flag of the four scripts, generated from their own parsers.

    python -m tools.flags        # rewrites docs/flags.md (a test checks that it is current)
"""
import argparse
import os

import config
import eval as eval_script
import inference
from fileio import write_text

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "flags.md")


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
    parts = ["# Flags", "", "Generated from the scripts' parsers by `python -m tools.flags`; a test checks that it is "
             "current.", ""]
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
    write_text(PATH, flags_reference())
    print(f"wrote {PATH}")
