"""How far each way of attending an 8-bit cache lands from a float32 reference, on this device
and on the CPU stream, at an `8b` shard's decode shape (batch 8, 32 query / 8 KV heads of 128,
1,280 positions, 255 of them masked room as a CUDA whole-allocation read has).

mlx-lm's quantized attention scales its queries in place (`queries *= scale` rewrites the
array every lazy graph holding it shares), so each call here gets its own copy.

    python kv_attention_accuracy.py
"""

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention as qsdpa

B, H, KV, D, T, ROOM = 8, 32, 8, 128, 1280, 255
R = H // KV
scale = D**-0.5
mx.random.seed(0)
q = mx.random.normal((B, H, 1, D)).astype(mx.bfloat16)
k = (mx.random.normal((B, KV, T, D)) * 2).astype(mx.bfloat16)
v = mx.random.normal((B, KV, T, D)).astype(mx.bfloat16)
pad = mx.array([(i * 37) % 64 for i in range(B)])
pos = mx.arange(T)
mask = ((pos[None] >= pad[:, None]) & (pos[None] < T - ROOM))[:, None, None, :]  # (B, 1, 1, T)
mx.eval(q, k, v, mask)

for device in (mx.default_device(), mx.cpu):
    with mx.stream(device):
        kq = mx.quantize(k, group_size=64, bits=8)
        vq = mx.quantize(v, group_size=64, bits=8)
        kd = mx.dequantize(*kq, group_size=64, bits=8)
        vd = mx.dequantize(*vq, group_size=64, bits=8)
        ref = mx.fast.scaled_dot_product_attention(
            q.astype(mx.float32), kd.astype(mx.float32), vd.astype(mx.float32), scale=scale, mask=mask
        )
        ways = {
            "mlx-lm quantized (broadcast heads)": qsdpa(q * 1, kq, vq, scale=scale, mask=mask, group_size=64, bits=8),
            "quantized, heads repeated": qsdpa(
                q * 1,
                tuple(mx.contiguous(mx.repeat(x, R, axis=1)) for x in kq),
                tuple(mx.contiguous(mx.repeat(x, R, axis=1)) for x in vq),
                scale=scale,
                mask=mask,
                group_size=64,
                bits=8,
            ),
            "dequantized, fused SDPA": mx.fast.scaled_dot_product_attention(q, kd, vd, scale=scale, mask=mask),
        }
        print(device, "reference max |out|", round(mx.abs(ref).max().item(), 4))
        for name, out in ways.items():
            err = mx.abs(out.astype(mx.float32) - ref)
            print(f"  {name:38s} max err {err.max().item():.4f}  mean err {err.mean().item():.5f}")
