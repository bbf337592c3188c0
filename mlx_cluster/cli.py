"""The `mlx-cluster` command: up, down, status, top, logs, serve, bench, hostfile, plan, make-model.

Each subcommand imports its module only when run, so `mlx-cluster bench` never loads MLX
and `mlx-cluster status` answers instantly.
"""

from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="path to cluster.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config key, e.g. --set server.port=8001 (repeatable)",
    )


def _load(args):
    from mlx_cluster.config import load_config

    return load_config(args.config, args.overrides)


def cmd_up(args) -> int:
    from mlx_cluster.launcher.supervisor import run_cluster

    return run_cluster(_load(args), config_path=args.config)


def cmd_serve(args) -> int:
    from mlx_cluster.config import load_config
    from mlx_cluster.launcher.supervisor import run_cluster

    overrides = [f"model.path={args.model}", f"server.port={args.port}", f"server.host={args.host}"]
    overrides += ["hosts=[{host: localhost, ranks: 1, ips: [127.0.0.1]}]"]
    overrides += ["supervisor.restart=never"] if args.no_restart else []
    config = load_config(args.config, overrides + args.overrides)
    return run_cluster(config, config_path=None)


def cmd_down(args) -> int:
    from mlx_cluster.launcher.control import down

    return down(_load(args), timeout_s=args.timeout)


def cmd_status(args) -> int:
    from mlx_cluster.launcher.control import status

    return status(_load(args), as_json=args.json)


def cmd_top(args) -> int:
    from mlx_cluster.launcher.status_view import top

    return top(_load(args), interval_s=args.interval)


def cmd_logs(args) -> int:
    from mlx_cluster.launcher.control import logs

    return logs(_load(args), follow=args.follow, rank=args.rank, lines=args.lines)


def cmd_hostfile(args) -> int:
    from mlx_cluster.launcher.placement import write_hostfile

    text = write_hostfile(_load(args))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_make_model(args) -> int:
    from mlx_cluster.launcher.progress import show_progress_of_this_process
    from mlx_cluster.models.builtin import make_model

    show_progress_of_this_process()  # a bar on a terminal, plain lines otherwise
    path = make_model(args.dir, args.preset)
    print(path)
    return 0


def cmd_bench(args) -> int:
    from mlx_cluster.bench.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start every rank of a cluster and serve until Ctrl-C/SIGTERM")
    _add_config_args(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("serve", help="serve one model from one local process")
    p.add_argument("--model", default="builtin:tiny", help="local mlx-lm directory, HF repo id, or builtin:NAME")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", default=None, help="optional cluster.yaml for the other settings")
    p.add_argument("--no-restart", action="store_true", help="exit instead of restarting after a failure")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("down", help="drain and stop a running cluster")
    _add_config_args(p)
    p.add_argument("--timeout", type=float, default=None, help="seconds before stragglers are killed")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="ranks, pids, uptime, restarts and health of a running cluster")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("top", help="live full-screen view of every rank and the running requests")
    _add_config_args(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("logs", help="show the per-rank logs of a cluster")
    _add_config_args(p)
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("-n", "--lines", type=int, default=50)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("hostfile", help="write an mlx.launch-compatible hostfile")
    _add_config_args(p)
    p.add_argument("-o", "--output", default=None)
    p.set_defaults(func=cmd_hostfile)

    from mlx_cluster.launcher.plan_cli import add_plan_parser

    add_plan_parser(sub, _add_config_args)

    p = sub.add_parser("make-model", help="write a deterministic random-weight built-in model")
    p.add_argument("dir")
    p.add_argument("--preset", default="tiny", help="tiny | small | 1b | 8b | tiny-moe | 30b-a3b")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("bench", help="OpenAI streaming load generator")
    from mlx_cluster.bench.cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    from mlx_cluster.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as e:
        print(f"mlx-cluster: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code or 0)
