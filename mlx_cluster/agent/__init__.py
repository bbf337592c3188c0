"""Agent output handling below every API surface: tool-call formats and parsers, reasoning split."""
