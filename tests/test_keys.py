"""Chained block keys: fixed test vectors, the chaining rule, and errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from memkv_mesh.keys import KEY_BYTES, ROOT, block_keys, namespace

# Fixed vectors: any change here breaks every stored block and every other node's lookups.
NS_LLAMA = "26898abd62b1ba452846108e5fee49c7a09f47fb31ec84c964dc8d1dcda22f8a"
KEYS_0_511 = [
    "70a5942eeba62959d4d45642cd2bc267e23aea7446681fe54acad9545fb49284",
    "ed02be7f3e507beb56aea05bc5adfb77ce6c09c8304e88b5f1c0ea9417528577",
]


def test_fixed_vectors() -> None:
    ns = namespace("meta-llama/Llama-3-8B", dtype="bfloat16")
    assert ns.hex() == NS_LLAMA
    assert [k.hex() for k in block_keys(list(range(512)), ns)] == KEYS_0_511
    assert block_keys([1, 2, 3, 4, 5], namespace("m"), block_tokens=2)[1].hex() == (
        "767012bc3c090c37294e5491014f0366c7684a5dbe556abff7887cfffedc92dc"
    )


def test_rule_matches_an_independent_computation() -> None:
    ns = namespace("m", tenant="acme")
    tokens = list(range(1000, 1000 + 12))
    prev = bytes(32)
    expect = []
    for i in range(3):
        data = b"".join(t.to_bytes(4, "little") for t in tokens[i * 4 : i * 4 + 4])
        prev = hashlib.blake2b(prev + data, digest_size=32, key=ns, person=b"memkv-block-v1").digest()
        expect.append(prev)
    assert block_keys(tokens, ns, block_tokens=4) == expect
    assert block_keys(np.array(tokens, dtype=np.int64), ns, block_tokens=4) == expect


def test_prefix_property_and_partial_chunk() -> None:
    ns = namespace("m")
    a = block_keys(list(range(1000)), ns)
    b = block_keys(list(range(768)) + [7] * 300, ns)
    assert len(a) == 3  # 1000 tokens: three whole chunks; the tail is not keyed
    assert a[:3] == b[:3]
    c = block_keys([5] + list(range(1, 1000)), ns)
    assert all(x != y for x, y in zip(a, c, strict=True))  # a change in chunk 0 changes every key


def test_namespaces_isolate() -> None:
    t = list(range(256))
    keys = {
        block_keys(t, namespace(m, dtype=d, tp_rank=r, tp_size=2, tenant=te))[0]
        for m in ("a", "b") for d in ("fp16", "bf16") for r in (0, 1) for te in ("", "x")
    }  # fmt: skip
    assert len(keys) == 16


def test_continue_a_chain_with_parent() -> None:
    ns = namespace("m")
    full = block_keys(list(range(1024)), ns)
    tail = block_keys(list(range(512, 1024)), ns, parent=full[1])
    assert tail == full[2:]
    assert block_keys([], ns) == [] and len(ROOT) == KEY_BYTES


def test_same_keys_in_another_process_with_another_hash_seed() -> None:
    code = "from memkv_mesh.keys import *; print(block_keys(list(range(512)), namespace('meta-llama/Llama-3-8B', dtype='bfloat16'))[1].hex())"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == KEYS_0_511[1]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: namespace(""), "model id"),
        (lambda: namespace("m", tp_rank=2, tp_size=2), "tp_rank"),
        (lambda: block_keys([1], b"short"), "namespace must be 32 bytes"),
        (lambda: block_keys([1], namespace("m"), parent=b"x"), "parent key"),
        (lambda: block_keys([-1], namespace("m"), block_tokens=1), r"\[0, 2\*\*32\)"),
        (lambda: block_keys([[1, 2]], namespace("m")), "one-dimensional"),
        (lambda: block_keys([1], namespace("m"), block_tokens=0), "block_tokens"),
    ],
)
def test_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
