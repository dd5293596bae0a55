"""`lightning-ray check|serve [--learn]|rollout|train|optimize CONFIG [key.sub=value ...]`, `lightning-ray view RUN_DIR`,
`lightning-ray scale RUN_DIR --workers N|auto`, `lightning-ray runner URL --agent module:fn`.

Overrides may come before, between or after the options (`rollout x.yaml --limit 8 trainer.steps=3`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from lightning_ray.checkpoints import ResumeError, resume_plan
from lightning_ray.config import Config, ConfigError, load_config
from lightning_ray.config.threads import cluster_address
from lightning_ray.environment import BrokenEnvironment, check_environment
from lightning_ray.faults import RunFault


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own (whose usage line an argument error prints)."""
    parser = argparse.ArgumentParser(prog="lightning-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = commands[name] = sub.add_parser(name, help=help)
        p.add_argument("config", help="YAML run description")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides, before or after the options")
        return p

    command(
        "check",
        "validate a config file: its fields, the dataset splits, the agent, the chat template and tool parser, "
        "and that it fits this machine or ray.address",
    )
    serve = command("serve", "start the inference service and the OpenAI-compatible gateway, print the URL")
    serve.add_argument(
        "--learn",
        action="store_true",
        help="also train on the rewarded live rollouts (the live: section; README 'Learning from live traffic')",
    )
    rollout = command("rollout", "run the dataset through the agent once and summarise")
    rollout.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    rollout.add_argument("--split", choices=["train", "val"], default="train")
    train = command("train", "train the agent with GRPO")
    train.add_argument("--resume", default=None, help="run directory to continue from its last checkpoint")
    command(
        "optimize",
        "improve the prompt optimize.prompt by critique-and-rewrite beam search, or select among "
        "optimize.candidates (prompts or models) by successive halving, scored on the validation split",
    )
    view = commands["view"] = sub.add_parser("view", help="serve the live run page of a run directory")
    view.add_argument("run_dir", help="a run directory (runs/<name>/<run>), during the run or after it")
    view.add_argument("--host", default="127.0.0.1", help="bind address; other than loopback needs a token")
    view.add_argument("--port", type=int, default=8266, help="0 takes a free port")
    view.add_argument(
        "--token", default=None, help="require this token (generated when --host is not loopback)"
    )
    scale = commands["scale"] = sub.add_parser("scale", help="set a running elastic run's rollout workers")
    scale.add_argument("run_dir", help="the run directory of a running `train`")
    scale.add_argument(
        "--workers",
        required=True,
        help="a count within rollout.min_workers..max_workers, or auto (queue depth)",
    )
    runner = commands["runner"] = sub.add_parser(
        "runner", help="run an agent's rollouts for a train run with gateway.runners.enabled, over HTTP"
    )
    runner.add_argument("url", help="the run's runners gateway (printed at start, RUN_DIR/runners.json)")
    runner.add_argument("--agent", required=True, help="module:function or module:Class, as rollout.agent")
    runner.add_argument(
        "--token",
        default=os.environ.get("LIGHTNING_RAY_TOKEN"),
        help="gateway.auth_token ($LIGHTNING_RAY_TOKEN)",
    )
    runner.add_argument("--name", default="runner", help="part of this runner's id in the run's records")
    runner.add_argument("--concurrency", type=int, default=1, help="rollouts run at once")
    runner.add_argument(
        "--max-rollouts", type=int, default=None, help="stop after N rollouts (default: never)"
    )
    runner.add_argument(
        "--patience", type=float, default=30.0, help="seconds to wait for a gateway that does not answer"
    )
    return parser, commands


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `overrides` holds every `key.sub=value` word in order, wherever it stood.

    argparse fills a `nargs="*"` positional only from the words before the first option, so the words after
    the options come back unparsed; those are overrides too. An unknown `--flag` or any other stray word
    exits with an error naming it."""
    parser, commands = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("view", "scale", "runner"):  # no config and no overrides
        if rest:
            commands[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "scale" and args.workers != "auto" and not args.workers.isdigit():
            commands["scale"].error(f"--workers: a number or auto, not {args.workers!r}")
        return args
    words = [*args.overrides, *rest]
    if flags := [w for w in words if w.startswith("-")]:
        commands[args.command].error(f"unrecognized arguments: {' '.join(flags)}")
    if stray := [w for w in words if "=" not in w or w.startswith("=")]:
        commands[args.command].error(f"not key.sub=value overrides: {' '.join(map(repr, stray))}")
    args.overrides = words
    return args


def cmd_check(cfg: Config) -> None:
    """The YAML was validated on loading; then what a run needs (`lightning_ray.preflight`) and the cluster."""
    from lightning_ray.preflight import preflight
    from lightning_ray.runtime import check_local

    for line in preflight(cfg):
        print(f"  {line}")
    print(
        f"  compute threads: inference.engine_threads {cfg.inference.engine_threads} per CPU engine, "
        f"learner.torch_threads {cfg.learner.torch_threads} per CPU learner rank"
    )
    if cluster_address(cfg):
        from lightning_ray.runtime import init_ray

        init_ray(cfg)
    else:
        check_local(cfg)
    print(f"{cfg.source}: ok")


def cmd_serve(cfg: Config, learn: bool) -> None:
    """Deploy the inference replicas, then run the gateway in front of them until Ctrl-C; with `learn`, the
    live gateway and the training loop on its rewarded rollouts (`lightning_ray.live.run`)."""
    if learn:
        from lightning_ray.live.run import learn as learn_live

        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # `live.scorer`'s module, found as the agent's is in `train`
        learn_live(cfg)
        return
    from lightning_ray.gateway.standalone import serve_gateway
    from lightning_ray.rollouts.stack import deploy_policies
    from lightning_ray.runtime import init_ray

    init_ray(cfg)
    handle = deploy_policies(cfg)
    try:
        asyncio.run(serve_gateway(cfg, handle=handle))
    finally:
        from ray import serve

        serve.shutdown()


def cmd_view(run_dir: str, host: str, port: int, token: str | None) -> None:
    """Serve the run page until Ctrl-C."""
    from lightning_ray.view.app import start_view

    page = start_view(run_dir, host, port, token)
    print(f"run page of {run_dir}: {page.url}", flush=True)
    try:
        page.thread.join()
    finally:
        page.stop()


def cmd_runner(args: argparse.Namespace) -> int:
    """Run rollouts for the run at `args.url` until it is over (or `--max-rollouts`)."""
    from lightning_ray.runners.client import RemoteRunner, RunnerError, RunnerGone

    sys.path.insert(0, os.getcwd())  # the agent's module, as rollout workers find it
    runner = RemoteRunner(
        args.url, args.token, name=args.name, concurrency=args.concurrency, patience_s=args.patience
    )
    try:
        counts = runner.run(args.agent, max_rollouts=args.max_rollouts)
    except RunnerGone as e:
        if runner.runner_id is None:
            print(f"error: no train run answers at {args.url}: {e}", file=sys.stderr)
            return 1
        counts = dict(runner.counts)
        print(f"the run is over ({e})")
    except RunnerError as e:
        print(f"error: the run refused this runner: {e}", file=sys.stderr)
        return 2
    print(f"runner {runner.runner_id}: rollouts {counts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "runner":
        try:
            return cmd_runner(args)
        except KeyboardInterrupt:
            return 130
    if args.command == "view":
        try:
            cmd_view(args.run_dir, args.host, args.port, args.token)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        return 0
    if args.command == "scale":
        from lightning_ray.scale import ScaleError, scale_workers

        try:
            print(scale_workers(args.run_dir, None if args.workers == "auto" else int(args.workers)))
        except ScaleError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        check_environment()
        if args.command == "check":
            cmd_check(cfg)
        elif args.command == "serve":
            cmd_serve(cfg, args.learn)
        elif args.command == "rollout":
            from lightning_ray.rollouts.run import run_rollout

            run_rollout(cfg, limit=args.limit, split=args.split)
        elif args.command == "train":
            if args.resume is not None:  # checked before Ray starts: a wrong folder fails in a second
                print(resume_plan(args.resume).describe(), flush=True)
            from lightning_ray.loop import train

            train(cfg, resume=args.resume)
        elif args.command == "optimize":
            from lightning_ray.optimize.run import optimize

            optimize(cfg)
    except (ConfigError, BrokenEnvironment, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFault as e:  # a named fault stopped the run; train() printed how to resume it
        print(f"run stopped: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
