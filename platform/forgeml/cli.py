"""The ``forgeml`` command line; the scripts in ``jobs/`` call the same functions.

forgeml train --config examples/wafer/config.yaml [--set train.max_epochs=3] [--resume [RUN]]
forgeml tune --config examples/wafer/tune.yaml [--set tune.num_trials=8] [--resume [SEARCH]]
forgeml serve run|deploy|build --model NAME[:vN] [--storage-root ROOT]
forgeml generate --model NAME[:vN] [--prompt TEXT] [--samples 5] [--temperature 1.0]
forgeml generate --model NAME[:vN] --output samples.png|samples.npz [--samples 64]
forgeml config schema
forgeml config validate --config FILE [--set ...]
forgeml models list [--config FILE | --storage-root ROOT]
forgeml models verify [NAME[:vN] ...] [--config FILE | --storage-root ROOT]
forgeml runs list [--model NAME] [--json]
forgeml runs compare NAME:vN NAME:vM ... [--all] [--json]
forgeml report --model NAME[:vN] [--output report.html]
forgeml explain --model NAME[:vN] --input request.json [--target CLASS] [--output explained.png]
forgeml monitor --model NAME[:vN] [--storage-root ROOT] [--set monitor.PATH=VALUE] [--interval S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgeml import console
from forgeml.config import (
    ConfigError,
    ExperimentConfig,
    StorageConfig,
    TaskConfig,
    json_schema,
    load_config,
    reference_markdown,
    variants,
)

EXIT_BAD_INPUT = 2
#: Images a PNG grid of ``forgeml generate`` holds at most (128 rows of 8).
MAX_GRID_IMAGES = 1024
EXIT_DIVERGED = 3
#: ``forgeml models verify`` found a package that differs from its manifest.
EXIT_DAMAGED = 4
#: The storage root could not be written or read (unreachable, or full) within its retries.
EXIT_STORAGE = 5


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


def _add_verbose_argument(parser: argparse.ArgumentParser, default=False) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default,
        help=f"show Ray's own info logs on the console too (or set {console.VERBOSE_ENV}=1)",
    )


def _command(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    """A (sub)command's parser; it takes ``--verbose`` after its name too, without
    overwriting a ``forgeml --verbose`` given before it."""
    parser = commands.add_parser(name, **kwargs)
    _add_verbose_argument(parser, default=argparse.SUPPRESS)
    return parser


def _add_train_command(commands) -> None:
    train = _command(commands, "train", help="train, evaluate and register a model")
    _add_config_arguments(train)
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue the latest run of this experiment (or the named RUN) from its checkpoint",
    )


def _add_tune_command(commands) -> None:
    tune = _command(
        commands,
        "tune",
        help="search hyperparameters (the config's tune section) and register the best",
    )
    _add_config_arguments(tune)
    tune.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="SEARCH",
        help="finish the latest search of this experiment (or the named SEARCH)",
    )


def _add_generate_command(commands) -> None:
    generate = _command(commands, "generate", help="draw samples from a generative model")
    generate.add_argument(
        "--model",
        required=True,
        metavar="NAME[:vN]",
        help="a registered language, seq2seq, vae or gan model",
    )
    _add_storage_arguments(generate)
    generate.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        metavar="TEXT",
        help="text to continue, or to translate (repeatable); default: start new texts",
    )
    generate.add_argument(
        "--samples",
        type=_at_least(int, 0),
        default=None,
        help="samples per prompt (default 5), or images (default 64)",
    )
    generate.add_argument(
        "--output",
        metavar="FILE",
        help="image models: a .png grid of the images, or .npz with their values ('images')",
    )
    generate.add_argument(
        "--max-tokens", type=_at_least(int, 0), default=40, help="new tokens per sample, at most"
    )
    generate.add_argument(
        "--temperature",
        type=_at_least(float, 0),
        default=1.0,
        help="below 1 sharpens the distribution, above 1 flattens it",
    )
    generate.add_argument(
        "--top-k",
        type=_at_least(int, 0, strict=False),
        default=None,
        help="sample from the k most likely tokens (0: all; default 50 for language "
        "models, 1, greedy, for seq2seq)",
    )
    generate.add_argument("--seed", type=int, default=0, help="seeds the sampling")


def _add_config_command(commands) -> None:
    config = _command(commands, "config", help="inspect the experiment schema")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    _command(config_commands, "schema", help="print the JSON Schema of experiment files")
    _command(config_commands, "docs", help="print the configuration reference (Markdown)")
    validate = _command(config_commands, "validate", help="check a config and print it resolved")
    _add_config_arguments(validate)


def _add_models_command(commands) -> None:
    models = _command(commands, "models", help="the model registry")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    _add_storage_arguments(_command(models_commands, "list", help="registered models"))
    verify = _command(
        models_commands,
        "verify",
        help="check packages against their manifests (sizes and sha256 of every file)",
    )
    verify.add_argument(
        "refs",
        nargs="*",
        metavar="NAME[:vN]",
        help="a version, or every version of a name; none: the whole registry",
    )
    _add_storage_arguments(verify)


def _add_runs_command(commands) -> None:
    runs = _command(commands, "runs", help="the runs behind registered models")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True)
    runs_list = _command(runs_commands, "list", help="every registered version's run")
    runs_list.add_argument(
        "--model", dest="models", action="append", metavar="NAME", help="only these (repeatable)"
    )
    compare = _command(runs_commands, "compare", help="versions side by side")
    compare.add_argument("refs", nargs="+", metavar="NAME[:vN]", help="registered versions")
    compare.add_argument(
        "--all", action="store_true", help="every config value, not only those that differ"
    )
    for sub in (runs_list, compare):
        _add_storage_arguments(sub)
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_report_command(commands) -> None:
    report = _command(
        commands,
        "report",
        help="write a registered model's HTML run report into its package again",
    )
    report.add_argument("--model", required=True, metavar="NAME[:vN]", help="registered version")
    report.add_argument("--output", type=Path, help="also write it to this file")
    _add_storage_arguments(report)


def _add_explain_command(commands) -> None:
    explain = _command(
        commands,
        "explain",
        help="explain predictions: Grad-CAM for images, SHAP values for tables and text",
    )
    explain.add_argument("--model", required=True, metavar="NAME[:vN]", help="registered version")
    explain.add_argument(
        "--input",
        required=True,
        type=Path,
        help='JSON file: a predict request body ({"instances": [...]}) or a list of instances',
    )
    explain.add_argument("--target", help="explain this class for every instance")
    explain.add_argument(
        "--output",
        type=Path,
        help="also draw them as this PNG: heat-maps over images, SHAP values as bars",
    )
    _add_storage_arguments(explain)


def _add_monitor_command(commands) -> None:
    monitor = _command(
        commands,
        "monitor",
        help="check a served model's recorded traffic for drift; retrain on an alarm",
    )
    monitor.add_argument("--model", required=True, metavar="NAME[:vN]", help="served version")
    _add_storage_arguments(monitor)
    monitor.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="monitor.PATH=VALUE",
        help="override a monitor setting, e.g. --set monitor.window_minutes=30",
    )
    monitor.add_argument(
        "--interval",
        type=_at_least(float, 0),
        help="check again every this many seconds, until interrupted (keeps the gauges live)",
    )


def _add_serve_command(commands) -> None:
    serving = _command(commands, "serve", help="serve registered models with Ray Serve")
    serve_commands = serving.add_subparsers(dest="serve_command", required=True)
    run = _command(
        serve_commands,
        "run",
        help="serve over HTTP until interrupted (embedded Ray runtime or a cluster)",
    )
    deploy = _command(
        serve_commands,
        "deploy",
        help="serve these versions on a running cluster, switching traffic without failed "
        "requests, and return",
    )
    build = _command(
        serve_commands, "build", help="print a Serve config (serve deploy, RayService)"
    )
    for sub in (run, deploy, build):
        _add_serve_arguments(sub)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in ``COMMANDS``, in their order."""
    parser = argparse.ArgumentParser(prog="forgeml", description=__doc__.split("\n")[0])
    _add_verbose_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def _at_least(kind: type, low: float, strict: bool = True):
    """An argparse type: a number above ``low`` (or equal to it, unless ``strict``)."""

    def parse(text: str):
        value = kind(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}")
        return value

    return parse


def _add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", help="use this experiment's storage settings")
    where.add_argument("--storage-root", help="local folder or s3://bucket/prefix")
    parser.add_argument("--storage-endpoint-url", help="S3 endpoint for --storage-root")
    parser.add_argument(
        "--storage-shared",
        action="store_true",
        help="--storage-root is a folder every Ray node mounts (storage.shared)",
    )


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="NAME[:vN]",
        help="a registered model, newest version unless :vN is given (repeatable)",
    )
    _add_storage_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 in clusters)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="serve without bearer-token authentication (default: token required)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="serve.PATH=VALUE",
        help="override a serve setting of every model, e.g. --set serve.max_batch_size=16",
    )


def _storage_config(args: argparse.Namespace) -> StorageConfig:
    if args.config:
        return load_config(args.config).storage
    if args.storage_root:
        return StorageConfig(
            root=args.storage_root,
            endpoint_url=args.storage_endpoint_url,
            shared=args.storage_shared,
        )
    return StorageConfig()


def _serve(args: argparse.Namespace) -> int:
    import yaml

    from forgeml.serve.auth import read_access
    from forgeml.serve.deploy import AppArgs, deploy, serve_config, undeploy

    bad = [o for o in args.overrides if not o.startswith("serve.")]
    if bad:
        raise ConfigError(f"--set when serving may only change serve.* settings (got {bad})")
    app_args = AppArgs(
        models=args.models,
        storage=_storage_config(args),
        auth=not args.no_auth,
        overrides=args.overrides,
    )
    if args.serve_command == "build":
        print(yaml.safe_dump(serve_config(app_args, args.host, args.port), sort_keys=False), end="")
        return 0
    from ray import serve

    from forgeml import runtime

    read_access(app_args.auth)  # refuse before starting anything
    runtime.connect(require_cluster=args.serve_command == "deploy")
    runtime.require_shared_storage(app_args.storage)
    serve.start(http_options={"host": args.host, "port": args.port})
    serving = deploy(app_args)
    refs = ", ".join(route.ref for route in serving.table.routes)
    print(f"serving {refs} at http://{args.host}:{args.port}/v1/models")
    if args.serve_command == "deploy":
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        undeploy()
    return 0


def _print_test_results(metrics: dict) -> None:
    """The test metrics, the baseline's beside them, and a warning if the model is
    worse than its baseline."""
    print(
        "test: "
        + "  ".join(
            f"{name} {value:.4f}"
            for name, value in metrics["test"].items()
            if isinstance(value, float)
        )
    )
    baseline = metrics.get("baseline")
    if baseline is None:
        return
    scores = "  ".join(f"{row['metric']} {row['baseline']:.4f}" for row in baseline["compared"])
    print(f"baseline ({baseline['model']}): {scores}")
    if baseline["warning"]:
        print(f"WARNING: {baseline['warning']}")


def _print_config_summary(cfg: ExperimentConfig) -> None:
    """What is about to run, in one line: the first thing a training console shows."""
    workers = cfg.scaling.num_workers
    device = "GPU" if cfg.scaling.use_gpu else "CPU"
    if cfg.task.acts:
        task = cfg.task
        limits = f"up to {task.max_iterations} iterations"
        if task.target_return is not None:
            limits += f" or return {task.target_return:g}"
        print(
            f"{cfg.name}: {task.algorithm.name} in {cfg.env.name} with a {cfg.model.kind} "
            f"policy; {limits}, {task.algorithm.train_batch_size} steps per batch, lr "
            f"{task.algorithm.lr:g}; {workers} env runner(s) of {task.envs_per_runner} "
            f"environments, {device} learner; storage {cfg.storage.root}",
            flush=True,
        )
        return
    print(
        f"{cfg.name}: {cfg.task.kind} with a {cfg.model.kind} model on {cfg.data.source.kind} "
        f"data; up to {cfg.train.max_epochs} epochs, batch {cfg.train.batch_size}, "
        f"{cfg.train.optimizer.name} lr {cfg.train.optimizer.lr:g}; {workers} {device} "
        f"worker(s); storage {cfg.storage.root}",
        flush=True,
    )


def _storage_failed(args: argparse.Namespace, failure) -> int:
    """The exit of a run or search that its storage failed, with the command that goes on."""
    print(
        f"forgeml: error: {failure}\nNothing was registered. Once the storage has room or "
        f"answers again: forgeml {args.command} --config {args.config} --resume {failure.run}",
        file=sys.stderr,
    )
    return EXIT_STORAGE


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from forgeml.storage import StorageFailure
    from forgeml.train.trainer import TrainingDiverged, run_training

    _print_config_summary(cfg)

    try:
        if cfg.task.acts:
            return _train_policy(cfg, args.resume)
        outcome = run_training(cfg, resume=args.resume)
    except TrainingDiverged as exc:
        print(f"forgeml: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except StorageFailure as exc:
        return _storage_failed(args, exc)
    print(
        f"\n{cfg.name}: {outcome.status} after {outcome.epochs} epochs "
        f"(best epoch {outcome.metrics['best_epoch']}, run {outcome.run_name})"
    )
    _print_test_results(outcome.metrics)
    print(f"registered {outcome.version.ref} at {outcome.version.uri}")
    root = cfg.storage.root
    if not cfg.task.served:
        needs = " --prompt TEXT" if cfg.task.needs_prompts else ""
        needs += " --output samples.png" if cfg.task.draws_images else ""
        print(
            f"sample it: forgeml generate --model {outcome.version.ref} --storage-root {root}"
            + needs
        )
        return 0
    _print_serve_hint(cfg, outcome.version.ref, "predict", '{"instances": [...]}')
    return 0


def _print_serve_hint(cfg: ExperimentConfig, ref: str, endpoint: str, body: str) -> None:
    print(
        f"serve it: FORGEML_SERVE_TOKEN=... python jobs/serve.py --model {ref} "
        f"--storage-root {cfg.storage.root}\n"
        f"then:     curl -H 'Authorization: Bearer ...' -H 'Content-Type: application/json' "
        f"-d '{body}' http://127.0.0.1:8000/v1/models/{cfg.name}/{endpoint}"
    )


def _train_policy(cfg: ExperimentConfig, resume: bool | str) -> int:
    """``forgeml train`` of a reinforcement experiment: the run, then the evaluation
    beside a random policy."""
    from forgeml.rl.train import run_reinforcement

    outcome = run_reinforcement(cfg, resume=resume)
    metrics = outcome.metrics
    print(
        f"\n{cfg.name}: {outcome.status} after {outcome.epochs} iterations "
        f"(registered iteration {metrics['best_epoch']}, run {outcome.run_name})"
    )
    _print_policy_results(cfg, metrics, outcome.version)
    return 0


def _print_policy_results(cfg: ExperimentConfig, metrics: dict, version) -> None:
    """A registered policy's evaluation beside the random policy's, and how to serve it."""
    test, baseline = metrics["test"], metrics["baseline"]["test"]
    success = f"  success rate {test['success_rate']:.3f}" if "success_rate" in test else ""
    print(
        f"evaluation ({test['episodes']} episodes): return {test['return_mean']:.2f} ± "
        f"{test['return_std']:.2f}  episode length {test['episode_length_mean']:.1f}{success}"
    )
    print(f"random policy: return {baseline['return_mean']:.2f} ± {baseline['return_std']:.2f}")
    if metrics["baseline"]["warning"]:
        print(f"WARNING: {metrics['baseline']['warning']}")
    print(f"registered {version.ref} at {version.uri}")
    _print_serve_hint(cfg, version.ref, "act", '{"observations": [[...]]}')


def _tune(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.tune is None:
        raise ConfigError(f"{args.config} has no tune section (see docs/configuration.md)")
    from forgeml.storage import StorageFailure
    from forgeml.tune.search import BEST_CONFIG_FILE, RESULTS_FILE, run_tuning

    _print_config_summary(cfg)
    print(
        f"search: {cfg.tune.planned_trials} trials ({cfg.tune.search.kind}, "
        f"{cfg.tune.scheduler.kind}) for the best {cfg.tune.metric}",
        flush=True,
    )
    try:
        if cfg.task.acts:
            from forgeml.rl.search import run_reinforcement_search

            outcome, counted = run_reinforcement_search(cfg, resume=args.resume), "iterations"
        else:
            outcome, counted = run_tuning(cfg, resume=args.resume), "epochs"
    except StorageFailure as exc:
        return _storage_failed(args, exc)
    columns = ["trial_id", *[c for c in outcome.trials if c.startswith("param.")]]
    columns += [cfg.tune.metric, counted, "seconds", "state"]
    print()
    print(outcome.trials[columns].to_string(index=False))
    print(f"\nsummary: {json.dumps(outcome.summary)}")
    print(f"results:     {outcome.uri}/{RESULTS_FILE}")
    print(f"best config: {outcome.uri}/{BEST_CONFIG_FILE}")
    if cfg.task.acts:
        _print_policy_results(cfg, outcome.metrics, outcome.version)
        return 0
    _print_test_results(outcome.metrics)
    print(f"registered {outcome.version.ref} at {outcome.version.uri}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from forgeml.model_package import load_model
    from forgeml.storage import ModelRegistry, Storage

    loaded = load_model(ModelRegistry(Storage(_storage_config(args))), args.model)
    task, task_cfg = loaded.task, loaded.config.task
    if task_cfg.draws_images:
        return _draw_images(args, loaded)
    if not task_cfg.writes_text:
        generators = [k for k, t in variants(TaskConfig).items() if t.draws_images or t.writes_text]
        raise ValueError(
            f"{loaded.version.ref}: a {task_cfg.kind} model does not generate; forgeml generate "
            f"draws from {', '.join(generators)} models"
        )
    if args.output:
        raise ValueError(f"{loaded.version.ref}: --output is for image models; texts print")
    if task_cfg.needs_prompts and not args.prompts:
        raise ValueError(f"{loaded.version.ref}: a {task_cfg.kind} model translates --prompt texts")
    samples = 5 if args.samples is None else args.samples
    prompts = [prompt for prompt in args.prompts or [""] for _ in range(samples)]
    samples = task.sample(
        loaded.model,
        loaded.preprocessor,
        prompts,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=task.default_top_k if args.top_k is None else args.top_k,
        generator=torch.Generator().manual_seed(args.seed),
    )
    for sample in samples:
        print(sample)
    return 0


def _draw_images(args: argparse.Namespace, loaded) -> int:
    """Draw images from a vae or gan model into a PNG grid or an .npz file."""
    import io

    import numpy as np
    import torch

    from forgeml.tasks.generative import map_grid_png

    ref = loaded.version.ref
    if args.prompts:
        raise ValueError(
            f"{ref}: a {loaded.config.task.kind} model draws images; it takes no --prompt"
        )
    output = Path(args.output or "")
    if output.suffix not in (".png", ".npz"):
        raise ValueError(f"{ref}: draws images: give --output FILE.png (a grid) or FILE.npz")
    count = 64 if args.samples is None else args.samples
    if output.suffix == ".png" and count > MAX_GRID_IMAGES:
        raise ValueError(
            f"--samples {count}: a PNG grid shows at most {MAX_GRID_IMAGES}; write .npz for more"
        )
    images = loaded.task.draw(loaded.model, count, torch.Generator().manual_seed(args.seed))
    buffer = io.BytesIO()
    if output.suffix == ".png":
        buffer.write(map_grid_png(images, loaded.preprocessor.max_value))
    else:
        np.savez_compressed(buffer, images=images)
    try:
        output.write_bytes(buffer.getvalue())
    except OSError as exc:
        raise ValueError(f"--output: cannot write {output}: {exc.strerror}") from None
    print(f"wrote {count} images drawn from {ref} to {output}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from forgeml.storage import ModelRegistry, Storage

    registry = ModelRegistry(Storage(_storage_config(args)))
    if args.models_command == "verify":
        return _verify_models(registry, args.refs)
    for name in registry.models():
        latest = registry.resolve(name)
        versions = ", ".join(f"v{v}" for v in registry.versions(name))
        print(f"{name}  latest {latest.ref}  versions {versions}  {latest.uri}")
    return 0


def _verify_models(registry, refs: list[str]) -> int:
    """Each chosen version against its manifest: ``ok`` or what differs; EXIT_DAMAGED if
    any differs."""
    versions = []
    for ref in refs or registry.models():
        numbers = [] if ":" in ref else registry.versions(ref)
        chosen = [f"{ref}:v{n}" for n in numbers] or [ref]  # resolve() names a bad ref
        versions += [registry.resolve(each) for each in chosen]
    damaged = 0
    for version in versions:
        problems = registry.verify(version)
        damaged += bool(problems)
        print(f"{version.ref}  {'ok' if not problems else 'DAMAGED'}  {version.uri}")
        for problem in problems:
            print(f"  {problem}")
    print(f"{len(versions)} versions checked, {damaged} damaged")
    return EXIT_DAMAGED if damaged else 0


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _print_table(rows: list[list]) -> None:
    """Rows of cells as aligned columns; the first row is the header."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _runs(args: argparse.Namespace) -> int:
    from forgeml.storage import ModelRegistry, Storage
    from forgeml.tracking import compare_runs, run_summaries, worse_text

    registry = ModelRegistry(Storage(_storage_config(args)))
    if args.runs_command == "compare":
        rows = compare_runs(registry, args.refs, every_param=args.all)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_table([[label, *values] for label, values in rows.items()])
        return 0
    summaries = run_summaries(registry, args.models)
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    header = [
        "MODEL",
        "REGISTERED",
        "RUN",
        "STATUS",
        "EPOCHS",
        "BEST",
        "SELECTED BY",
        "WALL S",
        "WORSE THAN BASELINE",
    ]
    table = [header]
    for run in summaries:
        selected = f"{run['selected_by']}={_cell(run['selected_value'])}"
        table.append(
            [
                run["model"],
                run["registered_at"],
                run["run"],
                run["status"],
                run["epochs"],
                run["best_epoch"],
                selected,
                run["wall_s"],
                worse_text(run["worse_than_baseline"]),
            ]
        )
    _print_table(table)
    return 0


def _report(args: argparse.Namespace) -> int:
    from forgeml.model_package import load_model, package_config
    from forgeml.report import (
        EVALUATION_FILE,
        REPORT_FILE,
        policy_report,
        read_arrays,
        run_report,
    )
    from forgeml.storage import ModelRegistry, Storage

    registry = ModelRegistry(Storage(_storage_config(args)))
    version = registry.resolve(args.model)
    cfg = package_config(registry, version)
    if cfg.task.acts:
        metrics = json.loads(registry.read(version, "metrics.json"))
        card = registry.read(version, "MODEL_CARD.md").decode()
        page = policy_report(version.ref, cfg, metrics, card)
    else:
        loaded = load_model(registry, version.ref)
        files = {
            name: registry.read(version, name)
            for name in ("MODEL_CARD.md", EVALUATION_FILE, "samples.png")
            if registry.has_file(version, name)
        }
        if EVALUATION_FILE not in files:
            raise ValueError(f"{version.ref} has no {EVALUATION_FILE}: it predates run reports")
        arrays = read_arrays(files[EVALUATION_FILE])
        page = run_report(version.ref, loaded, loaded.metrics, arrays, files)
    registry.replace_file(version, REPORT_FILE, page.encode())
    print(f"wrote {version.uri}/{REPORT_FILE}")
    if args.output:
        args.output.write_text(page)
        print(f"wrote {args.output}")
    return 0


def _read_instances(path: Path) -> list:
    """The instances of a predict request body (or a bare list of them) in a JSON file,
    validated as the HTTP API validates them."""
    from pydantic import ValidationError

    from forgeml.serve.schemas import PredictRequest

    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--input: cannot read {path}: {exc}") from None
    if isinstance(body, list):
        body = {"instances": body}
    try:
        return PredictRequest.model_validate(body).instances
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise ValueError(f"--input: {where}: {problem['msg']}") from None


def _explain(args: argparse.Namespace) -> int:
    import numpy as np

    from forgeml.explain import explain
    from forgeml.model_package import load_model
    from forgeml.storage import ModelRegistry, Storage

    loaded = load_model(ModelRegistry(Storage(_storage_config(args))), args.model)
    columns = loaded.preprocessor.request_columns(_read_instances(args.input))
    explained = explain(loaded, columns, args.target)
    if args.output:
        from forgeml.report import attributions_png, explanation_png

        heatmaps = [row.pop("heatmap", None) for row in explained]
        if heatmaps[0] is None:
            png = attributions_png(explained)
        else:
            inputs = loaded.preprocessor.transform(columns)["inputs"]
            titles = [f"{row['explained']}" for row in explained]
            png = explanation_png(loaded, inputs, titles, np.array(heatmaps))
        try:
            args.output.write_bytes(png)
        except OSError as exc:
            raise ValueError(f"--output: cannot write {args.output}: {exc.strerror}") from None
    print(json.dumps({"model": loaded.version.ref, "explanations": explained}, indent=2))
    return 0


def _monitor(args: argparse.Namespace) -> int:
    from forgeml import runtime
    from forgeml.monitor.check import DriftGauges, check
    from forgeml.storage import Storage

    bad = [text for text in args.overrides if not text.startswith("monitor.")]
    if bad:
        raise ValueError(f"--set: only monitor.* settings can be overridden here (got {bad[0]})")
    storage = Storage(_storage_config(args))
    runtime.connect()
    runtime.require_shared_storage(storage.cfg)
    gauges = DriftGauges()
    while True:
        report = check(storage, args.model, args.overrides, gauges)
        summary = {
            key: report.get(key)
            for key in ("model", "status", "rows", "max_psi", "drifted", "retrain", "report_uri")
        }
        print(json.dumps(summary), flush=True)
        if args.interval is None:
            return 0
        time.sleep(args.interval)


def _config(args: argparse.Namespace) -> int:
    if args.config_command == "schema":
        print(json_schema())
    elif args.config_command == "docs":
        print(reference_markdown(), end="")
    else:
        cfg: ExperimentConfig = load_config(args.config, args.overrides)
        print(cfg.to_yaml(), end="")
    return 0


@dataclass(frozen=True)
class Command:
    """A command: what adds its parser (with its help and arguments), what runs it."""

    add_parser: Callable[[Any], None]
    run: Callable[[argparse.Namespace], int]


#: Every command by name, in the order ``forgeml --help`` lists them.
COMMANDS: dict[str, Command] = {
    "train": Command(_add_train_command, _train),
    "tune": Command(_add_tune_command, _tune),
    "generate": Command(_add_generate_command, _generate),
    "config": Command(_add_config_command, _config),
    "models": Command(_add_models_command, _models),
    "runs": Command(_add_runs_command, _runs),
    "report": Command(_add_report_command, _report),
    "explain": Command(_add_explain_command, _explain),
    "monitor": Command(_add_monitor_command, _monitor),
    "serve": Command(_add_serve_command, _serve),
}


def _importable_working_directory() -> None:
    """Modules in the directory forgeml runs from import as with ``python -m`` (a user's
    ``env.entry_point``): the console script's own folder comes first on its path
    instead. Ray adds the driver's directory to its workers' paths; on another node
    the modules must be there too, installed, or in the job's working_dir."""
    folder = os.getcwd()
    if folder not in sys.path:
        sys.path.insert(0, folder)


def main(argv: list[str] | None = None) -> int:
    _importable_working_directory()
    args = build_parser().parse_args(argv)
    console.configure(verbose=args.verbose or console.verbose_from_environment())
    try:
        return COMMANDS[args.command].run(args)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"forgeml: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        cause = _bad_input_inside_ray(exc)
        if cause is None:
            raise
        print(f"forgeml: error: {cause}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        console.close_run_log()


def _bad_input_inside_ray(exc: BaseException) -> BaseException | None:
    """The ValueError (bad data) that a Ray Data task raised, from the error Ray re-raises."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ValueError, FileNotFoundError)):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


if __name__ == "__main__":
    sys.exit(main())
