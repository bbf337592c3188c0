"""Grammar-constrained decoding: grammars compiled on rank 0, token masks applied on every rank."""

from mlx_cluster.constrain.grammar import Answer, ConstraintSpec, GrammarCompiler, GrammarError, Tool, ToolSyntax
from mlx_cluster.constrain.matcher import TokenConstraint, install, make_constraint, sequence_constraint

__all__ = [
    "Answer",
    "ConstraintSpec",
    "GrammarCompiler",
    "GrammarError",
    "TokenConstraint",
    "Tool",
    "ToolSyntax",
    "install",
    "make_constraint",
    "sequence_constraint",
]
