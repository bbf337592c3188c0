"""Grammar-constrained decoding: grammars compiled on rank 0, token masks applied on every rank."""

from mlx_cluster.constrain.grammar import Answer, ConstraintSpec, GrammarCompiler, GrammarError, Tool, ToolSyntax
from mlx_cluster.constrain.matcher import (
    TokenConstraint,
    grammar_processors,
    install,
    logits_processor,
    make_constraint,
)

__all__ = [
    "Answer",
    "ConstraintSpec",
    "GrammarCompiler",
    "GrammarError",
    "TokenConstraint",
    "Tool",
    "ToolSyntax",
    "grammar_processors",
    "install",
    "logits_processor",
    "make_constraint",
]
