"""`lightning-ray check|serve|rollout|train CONFIG [key.sub=value ...]`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from lightning_ray.config import Config, ConfigError, check_resources, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("config", help="YAML run description")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        return p

    command("check", "validate a config file (and that it fits this machine or ray.address)")
    command("serve", "start the inference service and the OpenAI-compatible gateway, print the URL")
    rollout = command("rollout", "run the dataset through the agent once and summarise")
    rollout.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    rollout.add_argument("--split", choices=["train", "val"], default="train")
    train = command("train", "train the agent with GRPO")
    train.add_argument("--resume", default=None, help="run directory to continue from its last checkpoint")
    return parser


def cmd_check(cfg: Config) -> None:
    from lightning_ray.runtime import local_resources

    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        from lightning_ray.runtime import init_ray

        init_ray(cfg)
    else:
        check_resources(cfg, local_resources(cfg))
    print(f"{cfg.source}: ok")


def cmd_serve(cfg: Config) -> None:
    """Deploy the inference replicas, then run the gateway in front of them until Ctrl-C."""
    from lightning_ray.gateway.standalone import serve_gateway
    from lightning_ray.rollouts.run import deploy_policies
    from lightning_ray.runtime import init_ray

    init_ray(cfg)
    handle = deploy_policies(cfg)
    try:
        asyncio.run(serve_gateway(cfg, handle=handle))
    finally:
        from ray import serve

        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "check":
            cmd_check(cfg)
        elif args.command == "serve":
            cmd_serve(cfg)
        elif args.command == "rollout":
            from lightning_ray.rollouts.run import run_rollout

            run_rollout(cfg, limit=args.limit, split=args.split)
        elif args.command == "train":
            from lightning_ray.loop import train

            train(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
