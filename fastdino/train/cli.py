"""The command line: ``python -m fastdino.train`` / ``torchrun ... -m fastdino.train``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from fastdino.runtime import CollectiveTimeoutError, DiskFullError, get_logger, process_rank

from .config import ConfigError, TrainConfig, config_fields_help, parse_overrides, presets_table, resolve_config
from .preemption import INTERRUPTED_EXIT_CODE, exit_code_for

DEFAULT_PRESET = "tiny"  # with no arguments: the one-minute CPU run on synthetic images
logger = get_logger("train")

EXAMPLES = """\
examples:
  python -m fastdino.train                      # tiny CPU run on generated images (~1 min)
  torchrun --nproc_per_node=8 -m fastdino.train --preset vit_small_p8 \\
      --data /data/imagenet/train --output-dir runs/vits8
  python -m fastdino.train --preset vit_small_p16 --data DIR epochs=300 teacher_temp=0.07

Any config key can be overridden as key=value (--help-config lists them); the run resumes from
the newest checkpoint in --output-dir when there is one.
"""


def flag_keys() -> dict[str, str]:
    """--flag -> config key, for the fields the config marks as flags (the most common settings)."""
    return {"--" + spec.name.replace("_", "-"): spec.name for spec in dataclasses.fields(TrainConfig)
            if spec.metadata.get("flag")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastdino.train", description="Train DINO (self-distillation with no labels).",
        epilog=f"presets:\n{presets_table()}\n\n{EXAMPLES}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"starting config (default: {DEFAULT_PRESET})")
    for flag, key in flag_keys().items():
        # a bare --resume (the habit of other trainers) means --resume auto
        bare = dict(nargs="?", const="auto") if key == "resume" else {}
        parser.add_argument(flag, dest=key, metavar=key.upper(),
                            help=TrainConfig.__dataclass_fields__[key].metadata["help"], **bare)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="any config field")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # "--resume epochs=3": a bare --resume took the override after it as its value
        args.overrides.insert(0, args.resume)
        args.resume = "auto"
    if args.list_presets:
        print(presets_table())
        return 0
    if args.help_config:
        print(config_fields_help())
        return 0
    try:
        flag_overrides = parse_overrides(f"{key}={getattr(args, key)}" for key in flag_keys().values()
                                         if getattr(args, key) is not None)
        config = resolve_config(args.preset, {**parse_overrides(args.overrides), **flag_overrides})
    except ConfigError as error:
        if process_rank() == 0:
            parser.print_usage(sys.stderr)
            logger.error(error)
        return 2
    if args.print_config:
        import json

        print(json.dumps(config.to_dict(), indent=1))
        return 0

    from fastdino.data import ImageFolderError

    from .trainer import NonFiniteLossError, train

    try:
        result = train(config)
    except (ConfigError, ImageFolderError, NonFiniteLossError, DiskFullError) as error:
        if process_rank() == 0:  # every rank stops with the same error: say it once
            logger.error(error)
        return 2 if isinstance(error, (ConfigError, ImageFolderError)) else 1
    except CollectiveTimeoutError as error:  # each rank says what it waited in
        logger.error(error)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the first step
        logger.error("interrupted; rerun the same command to continue from the newest checkpoint")
        return INTERRUPTED_EXIT_CODE
    return exit_code_for(result.stopped_by) if result.stopped_by else 0
