"""mlx-cluster: tensor-parallel serving of MLX models with an OpenAI-compatible API."""

__version__ = "0.1.0"
