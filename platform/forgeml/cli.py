"""The ``forgeml`` command line; the scripts in ``jobs/`` call the same functions.

forgeml train --config examples/wafer/config.yaml [--set train.max_epochs=3] [--resume [RUN]]
forgeml config schema
forgeml config validate --config FILE [--set ...]
forgeml models list [--config FILE | --storage-root ROOT]
"""

from __future__ import annotations

import argparse
import logging
import sys

from forgeml.config import (
    ConfigError,
    ExperimentConfig,
    StorageConfig,
    json_schema,
    load_config,
    reference_markdown,
)

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a config field, e.g. --set train.max_epochs=3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgeml", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train, evaluate and register a model")
    _add_config_arguments(train)
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue the latest run of this experiment (or the named RUN) from its checkpoint",
    )

    config = commands.add_parser("config", help="inspect the experiment schema")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("schema", help="print the JSON Schema of experiment files")
    config_commands.add_parser("docs", help="print the configuration reference (Markdown)")
    validate = config_commands.add_parser("validate", help="check a config and print it resolved")
    _add_config_arguments(validate)

    models = commands.add_parser("models", help="the model registry")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    listing = models_commands.add_parser("list", help="registered models and versions")
    where = listing.add_mutually_exclusive_group()
    where.add_argument("--config", help="use this experiment's storage settings")
    where.add_argument("--storage-root", help="local folder or s3://bucket/prefix")
    return parser


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from forgeml.train.trainer import TrainingDiverged, run_training

    try:
        outcome = run_training(cfg, resume=args.resume)
    except TrainingDiverged as exc:
        print(f"forgeml: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    test = outcome.metrics["test"]
    print(
        f"\n{cfg.name}: {outcome.status} after {outcome.epochs} epochs "
        f"(best epoch {outcome.metrics['best_epoch']}, run {outcome.run_name})"
    )
    print(
        "test: "
        + "  ".join(
            f"{name} {test[name]:.4f}"
            for name in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "auroc_ovr")
        )
    )
    print(f"registered {outcome.version.ref} at {outcome.version.uri}")
    print(
        f"use it: forgeml.model_package.load_model(registry, {outcome.version.ref!r}); "
        f"metrics.json and MODEL_CARD.md are in that folder"
    )
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from forgeml.storage import ModelRegistry, Storage

    if args.config:
        storage_cfg = load_config(args.config).storage
    elif args.storage_root:
        storage_cfg = StorageConfig(root=args.storage_root)
    else:
        storage_cfg = StorageConfig()
    registry = ModelRegistry(Storage(storage_cfg))
    for name in registry.models():
        latest = registry.resolve(name)
        versions = ", ".join(f"v{v}" for v in registry.versions(name))
        print(f"{name}  latest {latest.ref}  versions {versions}  {latest.uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "config" and args.config_command == "schema":
            print(json_schema())
            return 0
        if args.command == "config" and args.config_command == "docs":
            print(reference_markdown(), end="")
            return 0
        if args.command == "config" and args.config_command == "validate":
            cfg: ExperimentConfig = load_config(args.config, args.overrides)
            print(cfg.to_yaml(), end="")
            return 0
        if args.command == "models":
            return _models_list(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"forgeml: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    raise AssertionError(f"unhandled command {args}")


if __name__ == "__main__":
    sys.exit(main())
