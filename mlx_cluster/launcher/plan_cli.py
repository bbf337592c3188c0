"""`mlx-cluster plan cluster.yaml`: what each rank will hold, printed without starting anything."""

from __future__ import annotations

import sys


def cmd_plan(args) -> int:
    from mlx_cluster.config import load_config
    from mlx_cluster.launcher.layout import LayoutError, plan_text
    from mlx_cluster.models.builtin import resolve_model_path
    from mlx_cluster.models.loader import resolve_local_path

    config = load_config(args.config, args.overrides)
    model = config.model
    try:
        # builtin:NAME is written once into its cache directory; a repo id is looked up locally
        # (or fetched, as `up` would); nothing else starts.
        path = resolve_local_path(resolve_model_path(model.path, model.builtin_dir), model.revision)
        print(f"model: {model.path} ({path})")
        print(f"ranks: {config.world_size} on {len(config.host_list())} host(s), backend {config.cluster.backend}")
        print(plan_text(config, path, config.world_size))
    except (LayoutError, ValueError) as e:
        print(f"mlx-cluster: {e}", file=sys.stderr)
        return 2
    return 0


def add_plan_parser(sub, add_config_args) -> None:
    p = sub.add_parser("plan", help="print each rank's layers, heads, weights, KV budget and collectives")
    add_config_args(p)
    p.set_defaults(func=cmd_plan)
