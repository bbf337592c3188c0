"""Where does a tensor-parallel decode step spend its time? Run once per rank, e.g.

    MLX_RANK=0 MLX_WORLD_SIZE=2 NCCL_HOST_IP=127.0.0.1 NCCL_PORT=6200 CUDA_VISIBLE_DEVICES=0 \
        python benchmarks/tp_profile.py /tmp/mlxc-8b &
    MLX_RANK=1 ... CUDA_VISIBLE_DEVICES=1 python benchmarks/tp_profile.py /tmp/mlxc-8b

Times (ms per decode step, batch 1): the model forward alone, the forward plus one bus-sized
all_sum evaluated before it (what the engine does), and bare all_sums of one hidden vector.
"""

import sys
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlx_cluster.models.loader import load_model_shard


def timed(label: str, fn, n: int = 30) -> None:
    for _ in range(3):
        fn()
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    mx.synchronize()
    if group.rank() == 0:
        print(f"{label:<58} {(time.perf_counter() - t0) / n * 1e3:8.3f} ms", flush=True)


group = mx.distributed.init(backend="nccl" if mx.cuda.is_available() else "ring", strict=True)
stream = mx.new_stream(mx.default_device())
with mx.stream(stream):
    loaded = load_model_shard(sys.argv[1], group)
    model = loaded.model
    hidden = loaded.config["hidden_size"]
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1] * 16]), cache=cache))
    token = mx.array([[5]])

    def forward():
        mx.eval(model(token, cache=cache))

    def forward_async_pipelined():
        # Like mlx-lm's generator: build step k+1 before waiting on step k.
        y = model(token, cache=cache)
        mx.async_eval(y)

    def bus_then_forward():
        mx.eval(mx.distributed.all_sum(mx.zeros((256,), dtype=mx.uint8), group=group))
        mx.eval(model(token, cache=cache))

    x = mx.ones((1, hidden), dtype=mx.bfloat16)

    def one_all_sum():
        mx.eval(mx.distributed.all_sum(x, group=group))

    def all_sums_in_one_graph():
        y = x
        for _ in range(64):
            y = mx.distributed.all_sum(y, group=group) * 0.5
        mx.eval(y)

    timed(f"forward, batch 1 (TP={group.size()})", forward)
    timed("forward, async-pipelined", forward_async_pipelined)
    timed("bus all_sum (256 B) + forward", bus_then_forward)
    timed("one all_sum of (1, hidden) bf16, evaluated alone", one_all_sum, 200)
    timed("64 chained all_sums in one graph", all_sums_in_one_graph, 20)

    # Experiments: is it the weights' memory layout, or the collectives inside the graph?
    if "--experiments" in sys.argv:
        layouts = {
            k: (v.shape, v.strides if hasattr(v, "strides") else None)
            for k, v in list(
                dict(__import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(model.parameters())).items()
            )[:6]
        }
        if group.rank() == 0:
            print("sample params:", {k: s for k, (s, _) in layouts.items()}, flush=True)
        real_all_sum = mx.distributed.all_sum
        mx.distributed.all_sum = lambda x, *a, **k: x  # wrong numbers, right compute
        timed("forward with all_sums stubbed out (compute only)", forward)
        mx.distributed.all_sum = real_all_sum
        from mlx.utils import tree_flatten, tree_unflatten

        params = [(k, mx.contiguous(v)) for k, v in tree_flatten(model.parameters())]
        model.update(tree_unflatten(params))
        mx.eval(model.parameters())
        timed("forward after mx.contiguous on every parameter", forward)
