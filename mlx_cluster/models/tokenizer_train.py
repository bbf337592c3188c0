"""Train the byte-level BPE tokenizer that the built-in random-weight models ship with.

Everything here is local and deterministic: the training text is the small corpus shipped in
``mlx_cluster/models/corpus/`` plus pseudo-words made by a fixed-seed generator, so two machines
(with the same ``tokenizers`` release) produce byte-identical ``tokenizer.json`` files. That
matters in a cluster, where every host materialises ``builtin:NAME`` on its own and all ranks
must agree on token ids.

The shipped corpus was made once with ``python -m mlx_cluster.models.tokenizer_train
--regenerate-corpus`` (docstrings of standard-library modules). Training never reads the
standard library itself, because its docstrings change between Python versions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"

# Control tokens. Trained first, so their ids are 0, 1, 2 in every vocabulary.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Tool-call markers, added after training as ordinary (non-special) tokens, like Qwen/Hermes
# checkpoints do: they survive `skip_special_tokens=True` decoding and a tool-call start is one token.
EXTRA_TOKENS = ["<tool_call>", "</tool_call>"]

# ChatML with roles system/user/assistant/tool, content as a string or a list of
# {"type": "text", "text": ...} parts, optional `tools` (rendered into the system turn) and
# assistant `tool_calls` in the Hermes <tool_call>{json}</tool_call> format, which mlx-lm's
# "json_tools" parser (inferred from this template) understands. `enable_thinking=True` opens a
# <think> block in the reply (DeepSeek-R1 / Qwen3-thinking style); the markers are plain text
# here (not vocabulary tokens), so thinking stays off unless a request asks for it.
CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is string -%}
{{- content -}}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content -%}
{%- if part is string -%}
{{- part -}}
{%- elif part.type == 'text' -%}
{{- part.text -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages and messages[0].role == 'system' %}
{{- render_content(messages[0].content) + '\\n\\n' }}
{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' + (tool | tojson) }}
{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments ' }}
{{- 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, ' }}
{{- '"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first and tools %}
{#- already rendered together with the tools above -#}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' + render_content(message.content) }}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function is defined %}
{%- set tool_call = tool_call.function %}
{%- endif %}
{%- if message.content or not loop.first %}
{{- '\\n' }}
{%- endif %}
{{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{{- (tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking %}
{{- '<think>\\n' }}
{%- endif %}
{%- endif %}
"""


def corpus_texts() -> list[str]:
    """The shipped training text, one string per paragraph, in a fixed (sorted-file) order."""
    texts = []
    for path in sorted(CORPUS_DIR.glob("*.txt")):
        texts += [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return texts


def pseudo_words(n_words: int, seed: int = 20240601) -> list[str]:
    """Deterministic made-up words, 12 to a line.

    WHY: BPE merges cannot cross word boundaries, so ~250 KB of real text runs out of merges near
    10k tokens. Syllable soup supplies enough distinct words to fill a 32k vocabulary. Only
    `Random.random()` is used because Python guarantees its sequence for a given integer seed
    across versions (unlike choice/randrange, whose algorithms may change).
    """
    onsets = [*"bcdfghjklmnprstvwz", "br", "ch", "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr", ""]
    vowels = [*"aeiou", "ai", "ea", "ee", "ou", "io"]
    codas = [*"nrstlm", "nd", "st", "ng", "x", "", ""]
    rng = random.Random(seed)

    def pick(options: list[str]) -> str:
        return options[int(rng.random() * len(options))]

    def word() -> str:
        return "".join(pick(onsets) + pick(vowels) + pick(codas) for _ in range(1 + int(rng.random() * 4)))

    words = [word() for _ in range(n_words)]
    return [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]


def train_tokenizer(vocab_size: int):
    """Train a byte-level BPE with exactly `vocab_size` tokens (specials and tool markers included).

    Byte-level (GPT-2 style) with no normalizer, so any UTF-8 string round-trips exactly through
    encode/decode. Returns a `tokenizers.Tokenizer`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(EXTRA_TOKENS),
        min_frequency=0,  # the corpus is small: let rare pairs merge too, to reach the target size
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is unknown
        show_progress=False,
    )
    # ~2 pseudo-words per vocabulary entry is plenty to reach the target (see pseudo_words).
    tokenizer.train_from_iterator(corpus_texts() + pseudo_words(2 * vocab_size), trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    if tokenizer.get_vocab_size() != vocab_size:
        # A short vocabulary would leave embedding rows with no token: the model could sample an
        # id the detokenizer cannot decode. Fail loudly instead.
        raise RuntimeError(f"tokenizer training reached {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}")
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    """The tokenizer_config.json contents (loaded by transformers' AutoTokenizer / mlx-lm)."""
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        # WHY False: the default "clean up" rewrites " ." to "." and breaks decode(encode(s)) == s.
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def save_tokenizer(tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(model_max_length))
    write_json(out_dir / "special_tokens_map.json", {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN})


def write_json(path: Path, obj) -> None:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# Standard-library modules whose docstrings make up corpus/stdlib_docstrings.txt (in this order).
CORPUS_MODULES = (  # noqa: SIM905 (a long word list reads better as text)
    "abc argparse base64 bisect calendar collections contextlib copy csv dataclasses datetime decimal "
    "difflib enum fractions functools glob gzip hashlib heapq hmac html http.client inspect io ipaddress "
    "itertools json logging math mimetypes operator os pathlib pickle pprint queue random re secrets shlex "
    "shutil socket sqlite3 statistics string struct subprocess tarfile tempfile textwrap threading time "
    "timeit tokenize traceback types typing unittest urllib.parse uuid warnings weakref zipfile zlib"
).split()


def build_stdlib_corpus(max_bytes: int = 240_000) -> str:
    """Docstrings of public standard-library modules, classes and functions, up to `max_bytes`.

    Only used to (re)generate the shipped corpus file; training reads the shipped file.
    """
    import importlib
    import inspect

    chunks, size = [], 0
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        objects = [(name, module)] + [
            (attr, obj)
            for attr, obj in sorted(vars(module).items())
            if not attr.startswith("_")
            and getattr(obj, "__module__", None) == module.__name__
            and (inspect.isclass(obj) or inspect.isroutine(obj))
        ]
        for title, obj in objects:
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            chunk = f"{title}\n{doc}"
            size += len(chunk.encode("utf-8")) + 2
            if size > max_bytes:
                return "\n\n".join(chunks) + "\n"
            chunks.append(chunk)
    return "\n\n".join(chunks) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--regenerate-corpus"]:
        (CORPUS_DIR / "stdlib_docstrings.txt").write_text(build_stdlib_corpus(), encoding="utf-8")
    else:
        print("usage: python -m mlx_cluster.models.tokenizer_train --regenerate-corpus", file=sys.stderr)
        sys.exit(2)
