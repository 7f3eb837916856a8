"""Synthetic traces: multi-round chat with shared system prompts, and agentic tool loops.

Both are *sessions*: a session starts with a system prompt shared by every session of its kind,
and each turn appends new tokens (the user's message, or a tool's output, plus the model's previous
answer) to the conversation, so turn k+1's prompt extends turn k's prompt. Block ids follow the
Mooncake convention of chained hashes over ``block_tokens``-token blocks: a full block's id is fixed
once the block is full (so a later turn reuses it), while the trailing partial block gets a fresh
id every turn (its content, and so its chained hash, differs). System-prompt blocks get ids shared
across sessions of the same prompt.

Everything is drawn from one seeded ``random.Random``: the same arguments give the same trace.
Session starts are a Poisson process; turns follow after the previous answer plus a think (chat)
or tool (agentic) delay.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass

from .trace import Request

__all__ = ["SessionShape", "CHAT", "AGENTIC", "generate", "SHAPES"]


@dataclass(frozen=True)
class SessionShape:
    """The knobs of one kind of session. Lengths are tokens, delays seconds."""

    name: str
    system_prompts: int  # how many distinct shared system prompts exist
    system_tokens: tuple[int, int]  # uniform range of one system prompt's length
    turns: tuple[int, int]  # uniform range of turns per session
    new_tokens: tuple[int, int]  # uniform range of tokens appended per turn (user msg / tool output)
    output_tokens: tuple[int, int]  # uniform range of the model's answer per turn
    gap_s: tuple[float, float]  # uniform range of delay between a turn's answer and the next turn
    zipf_s: float  # popularity skew over system prompts (0 = uniform)


CHAT = SessionShape(
    name="chat",
    system_prompts=20,
    system_tokens=(300, 3000),
    turns=(1, 8),
    new_tokens=(20, 600),
    output_tokens=(50, 700),
    gap_s=(5.0, 60.0),
    zipf_s=1.1,
)

AGENTIC = SessionShape(
    name="agentic",
    system_prompts=6,
    system_tokens=(4000, 12000),  # tool definitions and instructions
    turns=(4, 30),
    new_tokens=(100, 4000),  # tool results
    output_tokens=(30, 300),  # a tool call
    gap_s=(0.2, 5.0),  # tool latency
    zipf_s=0.8,
)

SHAPES = {s.name: s for s in (CHAT, AGENTIC)}


def generate(
    shape: SessionShape,
    *,
    sessions_per_s: float,
    duration_s: float,
    seed: int = 0,
    block_tokens: int = 512,
    decode_tokens_per_s: float = 50.0,
) -> list[Request]:
    """Generate a trace of sessions of ``shape`` starting over ``duration_s`` seconds.

    Turns of sessions that started in the window may run past it. ``decode_tokens_per_s`` only
    sets how long an answer takes before the next turn of the same session can start.
    """
    if sessions_per_s <= 0 or duration_s <= 0:
        raise ValueError("sessions_per_s and duration_s must be > 0")
    if block_tokens <= 0:
        raise ValueError("block_tokens must be > 0")
    rng = random.Random(seed)
    ids = itertools.count()
    weights = [1.0 / (i + 1) ** shape.zipf_s for i in range(shape.system_prompts)]
    # System prompts: their full blocks are shared ids; their tail is part of each conversation.
    systems: list[tuple[int, list[int]]] = []
    for _ in range(shape.system_prompts):
        n = rng.randint(*shape.system_tokens)
        systems.append((n, [next(ids) for _ in range(n // block_tokens)]))

    # Heap of (time, seq, session state) for pending turns.
    heap: list[tuple[float, int, list[int], int, int]] = []
    seq = itertools.count()
    t = 0.0
    while True:
        t += rng.expovariate(sessions_per_s)
        if t >= duration_s:
            break
        sp = rng.choices(range(shape.system_prompts), weights)[0]
        tokens, full = systems[sp]
        turns = rng.randint(*shape.turns)
        # state: full-block ids so far, total tokens so far (before this turn's new tokens), turns left
        heapq.heappush(heap, (t, next(seq), list(full), tokens, turns))

    out: list[Request] = []
    while heap:
        t, _, full, tokens, left = heapq.heappop(heap)
        tokens += rng.randint(*shape.new_tokens)
        n_full = tokens // block_tokens
        while len(full) < n_full:
            full.append(next(ids))
        blocks = list(full)
        if tokens % block_tokens:
            blocks.append(next(ids))  # the partial tail: fresh content, fresh chained hash
        answer = rng.randint(*shape.output_tokens)
        out.append(Request(round(t, 3), tokens, answer, tuple(blocks)))
        if left > 1:
            t_next = t + answer / decode_tokens_per_s + rng.uniform(*shape.gap_s)
            heapq.heappush(heap, (t_next, next(seq), full, tokens + answer, left - 1))
    out.sort(key=lambda r: r.arrival_s)
    return out
