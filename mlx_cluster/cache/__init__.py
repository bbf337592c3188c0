"""Block-hashed prefix caching: a mirrored RAM tier and a per-rank SSD tier of KV blocks."""

from mlx_cluster.cache.prefix_cache import CacheStats, PrefixCache, kv_dtype, supports_prefix_cache

__all__ = ["CacheStats", "PrefixCache", "kv_dtype", "supports_prefix_cache"]
