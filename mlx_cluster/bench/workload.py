"""Synthetic prompts for the load generator.

The client cannot count tokens without the server's tokenizer, so prompt lengths are
approximate: prompts are built from a fixed list of short, common English words joined by
single spaces, and with the byte-pair tokenizers of current models each such word (with its
leading space) is usually one token. "input_len=128" therefore means "128 words, roughly
128 tokens"; the chat endpoint also adds the chat template's tokens. The report gives the
real prompt_tokens from the server's usage whenever the server returns it.
"""

from __future__ import annotations

import random

WORKLOADS = ("random", "shared-prefix")

# Common, lower-case words that are single tokens in the usual BPE vocabularies. The list is
# fixed (never sorted or deduplicated at run time) so that a seed always yields the same text.
_WORD_TEXT = """
the of and to in is it you that he was for on are with as his they be at one have this from
or had by hot but some what there we can out other were all your when up use word how said
an each she which do their time if will way about many then them would write like so these
her long make thing see him two has look more day could go come did my sound no most number
who over know water than call first people may down side been now find any new work part
take get place made live where after back little only round man year came show every good me
give our under name very through just form much great think say help low line before turn
cause same mean differ move right boy old too does tell set three want air well also play
small end put home read hand port large spell add even land here must big high such follow
act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer
school grow study still learn plant cover food sun four thought let keep eye never last door
between city tree cross since hard start might story saw far sea draw left late run while
press close night real life few stop open seem together next white children begin got walk
example ease paper often always music those both mark book letter until mile river car feet
care second group carry took rain eat room friend began idea fish mountain north once base
hear horse cut sure watch color face wood main enough plain girl usual young ready
"""
WORDS = tuple(_WORD_TEXT.split())


def random_words(rng: random.Random, n: int) -> str:
    """`n` words drawn uniformly from WORDS, joined by spaces (about `n` tokens)."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_prompts(
    workload: str,
    num: int,
    input_len: int,
    prefix_len: int = 0,
    seed: int = 0,
) -> list[str]:
    """Return `num` prompts for `workload`, deterministic for a given `seed`.

    - "random": every prompt is `input_len` independent random words.
    - "shared-prefix": every prompt is the same `prefix_len` words (drawn once from the seed)
      followed by `input_len` random words, so about prefix_len + input_len tokens in all;
      this exercises the server's prefix cache.

    Prompt i depends only on (workload, input_len, prefix_len, seed, i): asking for more
    prompts appends to the list without changing the earlier ones, which lets the caller take
    its warmup prompts from the end without disturbing the measured ones.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")
    if num < 0 or input_len < 0 or prefix_len < 0:
        raise ValueError("num, input_len and prefix_len must be >= 0")
    rng = random.Random(seed)
    prefix = random_words(rng, prefix_len) if workload == "shared-prefix" and prefix_len else ""
    prompts = []
    for _ in range(num):
        suffix = random_words(rng, input_len)
        prompts.append(f"{prefix} {suffix}" if prefix and suffix else prefix or suffix)
    return prompts
