"""The documentation cannot drift from the code: the flag reference is generated from the parsers, and
every flag the README names is one a script takes."""
import os
import re

import bench
import cli
import config
import eval as eval_script
import inference
import results
import sweep
from conftest import REPO


def test_flag_reference_is_current():
    with open(os.path.join(REPO, "docs", "flags.md")) as f:
        assert f.read() == cli.flags_reference(), "docs/flags.md is stale: run python cli.py"


def test_readme_names_only_real_flags():
    with open(os.path.join(REPO, "README.md")) as f:
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z_-]+", f.read()))
    parsers = [config.build_parser(False), config.build_parser(True), inference.build_parser(), eval_script.build_parser(),
               sweep.build_parser(), bench.build_parser(), results.build_parser()]
    known = {name for p in parsers for action in p._actions for name in action.option_strings}
    tools = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint",
             "--logdir", "--no-deps", "--help"}  # torchrun's, tensorboard's, pip's
    assert named - known - tools == set()


def test_preset_values_are_typed_and_known_flags():
    defaults, _ = config.parse_args([], conditional=False)
    fields = set(config.values(defaults, config.TrainingConfig)) | set(config.model_config(defaults)) | {
        "timesteps", "beta_schedule", "prediction"}
    for preset_name, preset in config.PRESETS.items():
        assert set(preset) <= fields
        args, _ = config.parse_args(["--preset", preset_name], conditional=False)
        for name, value in preset.items():
            assert getattr(args, name) == value and type(getattr(args, name)) is type(value), name
