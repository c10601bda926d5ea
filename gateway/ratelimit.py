"""Rate-limit stage: tenant x route limits, answered with 429 and the IETF RateLimit fields.

Limits of a policy (``rate_limits`` in the config), each optional:

* requests per second with a burst, and requests per minute: GCRA (``gateway.gcra``);
* concurrent in-flight requests: leases that expire (a crashed gateway's slots come back);
* LLM tokens per minute: reserved at admission from the request (prompt estimate +
  ``max_tokens``, or the policy's ``default_max_tokens``), reconciled when the response's
  OpenAI-compatible ``usage`` arrives (the forwarder reads it, see ``gateway.usage``).

The counters live in the control Redis when one is configured (every gateway instance shares
them: one atomic script per decision, on Redis server time), else in process. Keys are
``tenant|route ident|kind`` (``Route.ident`` is host + prefix, stable across config reloads):
one tenant's limits never touch another's, and a reload keeps every tenant's counters.

Answers (draft-ietf-httpapi-ratelimit-headers, structured-field form): a refused request gets
``429`` problem+json with ``Retry-After`` (RFC 9110 §10.2.3), ``RateLimit-Policy`` and
``RateLimit``; with ``headers: always`` every limited response carries the two fields.
When Redis is in trouble the policy's ``on_redis_trouble`` decides: limit locally at
``local_share`` (fallback), admit (open), or refuse with 503 (closed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson

from gateway.errors import ClientError, NoHealthyUpstream
from gateway.exchange import new_request_id
from gateway.gcra import Decision, Limit, Source, per_minute
from gateway.ratelimit_store import TroubleMode, TroublePolicy
from gateway.usage import with_include_usage

if TYPE_CHECKING:
    from gateway.config import RateLimitPolicy
    from gateway.exchange import Exchange
    from gateway.metrics import Metrics
    from gateway.pipeline import BackgroundTasks, LocalReply
    from gateway.ratelimit_store import MemoryStore, SlotGrant


class PolicyStore(Protocol):
    """A store that takes a per-call TroublePolicy (``ResilientStore``, ``LocalStore``)."""

    async def charge(
        self,
        key: str,
        cost: float,
        limit: Limit,
        *,
        force: bool = False,
        trouble: TroublePolicy | None = None,
    ) -> Decision:
        """Charge ``cost`` to ``key`` (GCRA)."""
        ...

    async def acquire_slot(
        self,
        key: str,
        lease: str,
        capacity: int,
        ttl: float,
        *,
        trouble: TroublePolicy | None = None,
    ) -> SlotGrant:
        """Hold a concurrency slot."""
        ...

    async def release_slot(self, key: str, lease: str) -> None:
        """Free a concurrency slot."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...


class LocalStore:
    """The in-process store for one gateway without Redis: no trouble to handle.

    Args:
        memory: the MemoryStore that counts.
    """

    def __init__(self, memory: MemoryStore) -> None:
        self.memory = memory

    async def charge(
        self,
        key: str,
        cost: float,
        limit: Limit,
        *,
        force: bool = False,
        trouble: TroublePolicy | None = None,
    ) -> Decision:
        """Charge in process (``trouble`` does not apply)."""
        return self.memory.charge_nowait(key, cost, limit, force=force)

    async def acquire_slot(
        self,
        key: str,
        lease: str,
        capacity: int,
        ttl: float,
        *,
        trouble: TroublePolicy | None = None,
    ) -> SlotGrant:
        """Hold a slot in process."""
        return self.memory.acquire_slot_nowait(key, lease, capacity, ttl)

    async def release_slot(self, key: str, lease: str) -> None:
        """Free a slot in process."""
        self.memory.release_slot_nowait(key, lease)

    async def close(self) -> None:
        """Nothing to release."""


__all__ = [
    "CompiledPolicy",
    "LocalStore",
    "PolicyStore",
    "RateLimitStage",
    "RateLimited",
    "estimate_tokens",
]

MAX_ESTIMATED_BODY = 64 * 1024  # bytes: larger request bodies are estimated, not read
SLOT_TTL = 600.0  # seconds a concurrency lease lives if its gateway dies before releasing it
_CHARS_PER_TOKEN = 4  # the usual English estimate (OpenAI tokenizer guidance)


class RateLimited(ClientError):
    """A limit of the tenant's policy refused the request (429, RFC 6585 §4).

    Args:
        retry_after: seconds until the request would be admitted.
        fields: RateLimit-Policy / RateLimit header values.
    """

    status = 429
    slug = "rate-limited"
    title = "Rate limit exceeded"

    def __init__(self, detail: str, *, retry_after: float, fields: dict[str, str]) -> None:
        super().__init__(detail, retry_after=round(retry_after, 3))
        self.retry_after = retry_after
        self.fields = fields

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after))), **self.fields}


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A policy turned into limits once, at config load."""

    name: str
    request_limits: tuple[tuple[str, Limit], ...]  # (kind, limit): "rps", "rpm"
    tokens: Limit | None
    concurrent: int | None
    default_max_tokens: int
    trouble: TroublePolicy
    header: str = ""  # ``policy_field()``, rendered once by ``build``

    @classmethod
    def build(cls, name: str, p: RateLimitPolicy) -> CompiledPolicy:
        """Compile ``p``; the burst of requests_per_second defaults to the rate (>= 1)."""
        limits: list[tuple[str, Limit]] = []
        if p.requests_per_second is not None:
            burst = p.burst if p.burst is not None else max(1, math.ceil(p.requests_per_second))
            limits.append(("rps", Limit(p.requests_per_second, burst, name=f"{name}-rps")))
        if p.requests_per_minute is not None:
            limits.append(("rpm", per_minute(p.requests_per_minute, name=f"{name}-rpm")))
        tokens = (
            per_minute(p.tokens_per_minute, name=f"{name}-tpm") if p.tokens_per_minute else None
        )
        compiled = cls(
            name=name,
            request_limits=tuple(limits),
            tokens=tokens,
            concurrent=p.concurrent,
            default_max_tokens=p.default_max_tokens,
            trouble=TroublePolicy(mode=TroubleMode(p.on_redis_trouble), local_share=p.local_share),
        )
        return dataclasses.replace(compiled, header=compiled.policy_field())

    def policy_field(self) -> str:
        """``RateLimit-Policy`` items: quota ``q`` per window ``w`` seconds."""
        items = [
            f'"{limit.name}";q={_num(limit.burst)};w={_num(limit.burst / limit.rate)}'
            for _, limit in self.request_limits
        ]
        if self.tokens is not None:
            items.append(f'"{self.tokens.name}";q={_num(self.tokens.burst)};w=60;qu="tokens"')
        return ", ".join(items)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}".rstrip("0")


def _ratelimit_field(decision: Decision) -> str:
    """One ``RateLimit`` item: remaining ``r`` and seconds ``t`` until the quota is back."""
    reset = math.ceil(decision.retry_after if not decision.allowed else decision.reset_after)
    return f'"{decision.limit.name}";r={max(0, decision.remaining)};t={max(0, reset)}'


def estimate_tokens(body: bytes, default_max_tokens: int) -> int:
    """Tokens to reserve for a request before the model answers.

    OpenAI-style bodies: prompt characters / 4 plus ``max_completion_tokens`` or
    ``max_tokens``; other JSON (LangServe ``input``): characters / 4 plus
    ``default_max_tokens``. Never less than 1.

    Args:
        body: the request body (at most the buffered-body size).
        default_max_tokens: the completion budget when the request names none.
    """
    max_tokens = default_max_tokens
    prompt_chars = len(body)
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        named = data.get("max_completion_tokens") or data.get("max_tokens")
        if isinstance(named, int) and named > 0:
            max_tokens = named
        messages = data.get("messages")
        if isinstance(messages, list):
            prompt_chars = sum(
                len(m["content"])
                for m in messages
                if isinstance(m, dict) and isinstance(m.get("content"), str)
            )
    return max(1, prompt_chars // _CHARS_PER_TOKEN + max_tokens)


class RateLimitStage:
    """Admit or refuse per tenant x route; reconcile tokens and free slots on completion.

    Args:
        policies: policy name -> config, from ``rate_limits``.
        store: where the counters live (a ResilientStore around Redis, or a MemoryStore).
        metrics: decisions are counted by route, policy and result (never by tenant: the set
            of tenants is unbounded).
        tasks: where completion work that must await (slot release, token reconciliation)
            runs after the response.
        always_headers: send RateLimit-Policy / RateLimit on every limited response, not just
            on 429.
    """

    name = "ratelimit"

    def __init__(
        self,
        policies: Mapping[str, RateLimitPolicy],
        store: PolicyStore,
        *,
        metrics: Metrics,
        tasks: BackgroundTasks,
        always_headers: bool = False,
    ) -> None:
        self._policies = {name: CompiledPolicy.build(name, p) for name, p in policies.items()}
        self._store = store
        # the in-process store answers synchronously: skip building a coroutine per limit
        self._charge_now = store.memory.charge_nowait if isinstance(store, LocalStore) else None
        self._metrics = metrics
        self._tasks = tasks
        self._always = always_headers

    def policy_for(self, ex: Exchange) -> CompiledPolicy | None:
        """The policy that applies to ``ex``: the tenant's for the route, else the route's."""
        route, tenant = ex.route, ex.tenant
        if route is None or tenant is None:
            return None
        name = tenant.limits.get(route.prefix, route.rate_limit)
        return self._policies.get(name) if name is not None else None

    async def on_request(self, ex: Exchange) -> LocalReply | None:
        """Charge every limit of the policy; refuse on the first that is exhausted.

        A refusal refunds the limits already charged for this request, so a request that is
        refused never uses quota.

        Raises:
            RateLimited: a limit is exhausted (429).
            NoHealthyUpstream: Redis is in trouble and the policy is fail-closed (503).
        """
        policy = self.policy_for(ex)
        if policy is None:
            return None
        assert ex.route is not None
        assert ex.tenant is not None
        base = f"{ex.tenant.id}|{ex.route.ident}"
        store, trouble = self._store, policy.trouble
        charged: list[tuple[str, float, Limit]] = []
        decisions: list[Decision] = []
        charge_now = self._charge_now
        for kind, limit in policy.request_limits:
            key = f"{base}|{kind}"
            if charge_now is not None:  # in process: exact without a coroutine
                decision = charge_now(key, 1, limit)
            else:
                decision = await store.charge(key, 1, limit, trouble=trouble)
            if not decision.allowed:
                await self._refuse(ex, policy, decision, charged)
            charged.append((key, 1, limit))
            decisions.append(decision)
        request = ex.request
        if policy.tokens is not None and request.body_exists:  # no body: no model is asked
            length = request.content_length
            body = b""
            if length is not None and length <= MAX_ESTIMATED_BODY:
                body = await request.read()  # cached by aiohttp: the forwarder reuses it
                estimate = estimate_tokens(body, policy.default_max_tokens)
            else:  # large or chunked: never buffered here; estimate from the length alone
                estimate = (length or 0) // 4 + policy.default_max_tokens
            reserve = min(estimate, int(policy.tokens.burst))
            decision = await store.charge(f"{base}|tpm", reserve, policy.tokens, trouble=trouble)
            if not decision.allowed:
                await self._refuse(ex, policy, decision, charged)
            charged.append((f"{base}|tpm", reserve, policy.tokens))
            decisions.append(decision)
            ex.token_reservation = reserve
            if body and (rewritten := with_include_usage(body)) is not None:
                ex.body_override = rewritten  # so the final stream chunk reports usage
                ex.strip_usage_chunk = True
        if policy.concurrent is not None:
            lease = new_request_id()  # unique, like the request's own id
            grant = await store.acquire_slot(
                f"{base}|conc", lease, policy.concurrent, SLOT_TTL, trouble=trouble
            )
            if not grant:
                retry = Decision(
                    allowed=False, remaining=0, retry_after=1.0, reset_after=1.0,
                    limit=Limit(float(policy.concurrent), policy.concurrent,
                                name=f"{policy.name}-concurrency"),
                    source=grant.source,
                )  # fmt: skip
                await self._refuse(ex, policy, retry, charged)
            ex.slot_lease = (f"{base}|conc", lease)
        self._count(ex, policy, decisions, "allowed")
        if self._always and decisions:
            headers = ex.response_headers
            headers["RateLimit-Policy"] = policy.header
            headers["RateLimit"] = (
                _ratelimit_field(decisions[0])
                if len(decisions) == 1
                else ", ".join(map(_ratelimit_field, decisions))
            )
        return None

    async def _refuse(
        self,
        ex: Exchange,
        policy: CompiledPolicy,
        decision: Decision,
        charged: list[tuple[str, float, Limit]],
    ) -> None:
        trouble = policy.trouble
        for key, cost, limit in charged:  # a refused request uses no quota
            await self._store.charge(key, -cost, limit, trouble=trouble)
        if decision.source is Source.CLOSED:
            self._count(ex, policy, [decision], "error")
            raise NoHealthyUpstream(
                "the rate-limit store is unavailable and this policy fails closed",
                retry_after=max(1, math.ceil(decision.retry_after)),
            )
        self._count(ex, policy, [decision], "limited")
        raise RateLimited(
            f"limit {decision.limit.name!r} exhausted; retry in {decision.retry_after:.3f} s",
            retry_after=decision.retry_after,
            fields={
                "RateLimit-Policy": policy.header,
                "RateLimit": _ratelimit_field(decision),
            },
        )

    def _count(
        self, ex: Exchange, policy: CompiledPolicy, decisions: list[Decision], result: str
    ) -> None:
        assert ex.route is not None
        if result == "allowed":
            for d in decisions:
                if d.source is Source.FALLBACK:
                    result = "fallback"
                    break
        ex.ratelimit_result = result
        metrics = self._metrics
        metrics.ratelimit_decisions.labels(ex.route.prefix, policy.name, result).inc()

    def on_complete(self, ex: Exchange) -> None:
        """Free the concurrency slot and reconcile reserved tokens with the reported usage."""
        policy = self.policy_for(ex)
        if policy is None:
            return
        lease = ex.slot_lease
        if lease is not None:
            ex.slot_lease = None
            self._tasks.spawn(self._store.release_slot(*lease))
        reserved = ex.token_reservation
        if reserved and ex.cache_result in ("hit", "coalesced", "stale"):
            ex.usage_tokens = 0  # answered from the cache: no model spent a token
        if reserved and policy.tokens is not None and ex.usage_tokens is not None:
            assert ex.route is not None
            assert ex.tenant is not None
            key = f"{ex.tenant.id}|{ex.route.ident}|tpm"
            delta = ex.usage_tokens - reserved
            if delta:
                self._tasks.spawn(
                    self._store.charge(
                        key, delta, policy.tokens, force=True, trouble=policy.trouble
                    )
                )
