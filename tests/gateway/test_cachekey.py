"""Canonical cache keys: what must collide (same question) and what must not."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from gateway.cachekey import (
    canonical_json,
    http_key,
    is_deterministic,
    llm_key,
    nondeterminism,
    vary_key,
)

HTTP: dict[str, str] = dict(
    zone="eu", route="/", method="GET", scheme="https", host="api.example.com", target="/a?x=1"
)
LLM: dict[str, Any] = dict(
    zone="eu", scope="tenant-acme", route="/v1/", path="/v1/chat/completions"
)
BODY: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "Hello"}],
    "temperature": 0,
    "max_tokens": 16,
}


def key_of(body: Any, **overrides: Any) -> str:
    return llm_key(orjson.dumps(body), **{**LLM, **overrides}).key


def test_module_does_no_io() -> None:
    probe = (
        "import sys; sys.modules['redis'] = None; import gateway.cachekey; "
        "loaded = {'aiohttp', 'redis', 'asyncio', 'maxminddb'} & "
        "{k for k, v in sys.modules.items() if v is not None}; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


# --- http policy ------------------------------------------------------------------------------


def test_http_key_is_short_hex() -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", http_key(**HTTP))


@pytest.mark.parametrize(
    "change",
    [
        {"method": "HEAD"},  # a stored GET answers HEAD
        {"method": "get"},
        {"host": "API.Example.com"},
        {"host": "api.example.com:443"},  # default port of https
        {"scheme": "HTTPS"},
    ],
)
def test_http_key_same(change: dict[str, str]) -> None:
    assert http_key(**{**HTTP, **change}) == http_key(**HTTP)


@pytest.mark.parametrize(
    "change",
    [
        {"zone": "us"},
        {"route": "/v1/"},
        {"method": "POST"},
        {"scheme": "http"},
        {"host": "api.example.com:80"},  # https on port 80 is another origin
        {"host": "api.example.com:8443"},
        {"target": "/a?x=2"},
        {"target": "/a?x=1&"},  # query kept byte-exact
        {"target": "/A?x=1"},
        {"target": "/a%3Fx=1"},
    ],
)
def test_http_key_differs(change: dict[str, str]) -> None:
    assert http_key(**{**HTTP, **change}) != http_key(**HTTP)


def test_http_port_80_is_default_for_http_only() -> None:
    plain = {**HTTP, "scheme": "http"}
    assert http_key(**{**plain, "host": "h:80"}) == http_key(**{**plain, "host": "h"})


def test_parts_cannot_run_into_each_other() -> None:
    assert http_key(**{**HTTP, "zone": "eu/", "route": ""}) != http_key(**{**HTTP, "route": "//"})


# --- Vary secondary key -----------------------------------------------------------------------


def test_vary_key() -> None:
    names = ["Accept-Encoding", "accept-language"]
    first = vary_key(names, [("Accept-Encoding", "gzip, br"), ("Accept-Language", "de")])
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    same = CIMultiDict(
        [("accept-language", "de"), ("accept-encoding", "gzip"), ("ACCEPT-ENCODING", "br")]
    )
    assert vary_key(reversed(names), same) == first  # names: any order and case; values normalised
    assert vary_key(names, [("Accept-Encoding", "gzip, br")]) != first
    assert vary_key(names, [("Accept-Encoding", "gzip, br"), ("Accept-Language", "fr")]) != first
    absent = vary_key(["x-a"], [])
    assert absent != vary_key(["x-a"], [("X-A", "")])  # absent only matches absent (§4.1)
    assert absent != vary_key(["x-a"], [("X-A", "-")])
    assert vary_key([], [("Accept", "x")]) == ""


# --- llm-exact policy: what collides -----------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(dict(reversed(BODY.items())), id="key-order"),
        pytest.param(
            {**BODY, "messages": [{"content": "Hello", "role": "user"}]}, id="nested-order"
        ),
        pytest.param({**BODY, "temperature": 0.0}, id="0.0-is-0"),
        pytest.param({**BODY, "temperature": -0.0}, id="-0-is-0"),
        pytest.param({**BODY, "max_tokens": 16.0}, id="16.0-is-16"),
        pytest.param({**BODY, "stream": True}, id="stream"),
        pytest.param(
            {**BODY, "stream": False, "stream_options": {"include_usage": True}}, id="opts"
        ),
    ],
)
def test_llm_key_same(other: dict[str, Any]) -> None:
    assert key_of(other) == key_of(BODY)


@pytest.mark.parametrize(
    ("one", "two"),
    [
        (b'{"top_p": 0.10}', b'{"top_p": 0.1}'),
        (b'{"top_p": 1e-1}', b'{"top_p": 0.1}'),
        (b'{"max_tokens": 1e2}', b'{"max_tokens": 100}'),
        (b'{"a": -0}', b'{"a": 0}'),
        (b'{\n  "a" : [1, 2] }', b'{"a":[1,2]}'),
    ],
)
def test_llm_key_same_bytes(one: bytes, two: bytes) -> None:
    assert llm_key(one, **LLM).key == llm_key(two, **LLM).key


def test_canonical_json_shape() -> None:
    body = {"b": [1.0, {"z": 0.5, "a": -0.0}], "a": "Ünï ", "c": None, "d": True, "e": 2**60}
    assert canonical_json(body) == (
        '{"a":"Ünï ","b":[1,{"a":0,"z":0.5}],"c":null,"d":true,"e":1152921504606846976}'.encode()
    )


# --- llm-exact policy: what must not collide ---------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"zone": "us"},
        {"scope": "tenant-other"},
        {"route": "/v2/"},
        {"path": "/v1/completions"},
        {"extra": ("2023-06-01",)},
    ],
)
def test_llm_key_differs_by_context(change: dict[str, Any]) -> None:
    assert key_of(BODY, **change) != key_of(BODY)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({**BODY, "messages": [{"role": "user", "content": "Hello!"}]}, id="text"),
        pytest.param({**BODY, "messages": [{"role": "user", "content": "Hello "}]}, id="space"),
        pytest.param({**BODY, "messages": [{"role": "user", "content": "hello"}]}, id="case"),
        pytest.param({**BODY, "messages": [{"role": "system", "content": "Hello"}]}, id="role"),
        pytest.param({**BODY, "model": "m2"}, id="model"),
        pytest.param({**BODY, "temperature": 0.1}, id="temperature"),
        pytest.param({**BODY, "max_tokens": "16"}, id="string-number"),
        pytest.param({**BODY, "max_tokens": True}, id="bool-is-not-1"),
        pytest.param({**BODY, "user": "ann"}, id="user-unless-ignored"),
        pytest.param({**BODY, "tools": [{"name": "f", "stream": True}]}, id="nested-stream-kept"),
        pytest.param({**BODY, "messages": [*BODY["messages"], *BODY["messages"]]}, id="list-len"),
    ],
)
def test_llm_key_differs_by_body(other: dict[str, Any]) -> None:
    assert key_of(other) != key_of(BODY)


def test_unicode_is_not_normalised() -> None:
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    assert key_of({"q": nfc}) != key_of({"q": nfd})


def test_list_order_matters() -> None:
    assert key_of({"stop": ["a", "b"]}) != key_of({"stop": ["b", "a"]})


def test_ignore_fields_top_level_only() -> None:
    ignore = ("user", "metadata")
    plain = key_of(BODY, ignore_fields=ignore)
    assert key_of({**BODY, "user": "ann", "metadata": {"x": 1}}, ignore_fields=ignore) == plain
    nested = {**BODY, "messages": [{"role": "user", "content": "Hello", "user": "ann"}]}
    assert key_of(nested, ignore_fields=ignore) != plain
    assert key_of({**BODY, "user": "ann"}, ignore_fields=("metadata",)) != plain


def test_llm_key_keeps_the_body_as_sent() -> None:
    got = llm_key(orjson.dumps({**BODY, "stream": True}), **LLM)
    assert got.body["stream"] is True
    assert b"stream" not in got.canonical


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b'{"a": NaN}', b'{"a": Infinity}', b"\xff", b"[" * 1000 + b"]" * 1000],
)
def test_not_json_is_not_cacheable(body: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (orjson.JSONDecodeError or too deep)
        llm_key(body, **LLM)


def test_non_object_body_has_a_key_but_is_not_deterministic() -> None:
    got = llm_key(b"[1, 2.0]", **LLM)
    assert got.canonical == b"[1,2]"
    assert nondeterminism(got.body, default_temperature=0) == "body"


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "default", "reason"),
    [
        ({"temperature": 0}, None, None),
        ({"temperature": 0.0}, None, None),
        ({"temperature": 0, "seed": 7}, None, None),
        ({"temperature": 0.7, "seed": 7}, 0, "temperature"),  # seeds are best-effort
        ({"temperature": 0.7}, 0, "temperature"),
        ({}, None, "temperature-default"),
        ({}, 0, None),
        ({}, 0.0, None),
        ({}, 1.0, "temperature-default"),
        ({"temperature": None}, 0, None),  # null means "the default"
        ({"top_p": 0}, None, "temperature-default"),  # top_p alone does not count
        ({"top_p": 0, "temperature": 0}, None, None),
        ({"temperature": 0, "n": 1}, None, None),
        ({"temperature": 0, "n": 2}, None, "n"),
        ({"temperature": 0, "n": "1"}, None, "n"),
        ({"temperature": 0, "best_of": 3}, None, "n"),
        ({"temperature": "0"}, None, "temperature"),
        ({"temperature": False}, None, "temperature"),
        ([{"temperature": 0}], 0, "body"),
    ],
)
def test_determinism(body: object, default: float | None, reason: str | None) -> None:
    assert nondeterminism(body, default_temperature=default) == reason
    assert is_deterministic(body, default_temperature=default) is (reason is None)
