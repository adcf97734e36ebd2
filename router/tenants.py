"""Tenants: who may call the API (API keys, kept only as SHA-256 digests) and how much of it
each may use at once.

    # tenants.yaml (or the same document as JSON)
    tenants:
      - name: team-a
        keys: [9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08]  # sha256 hex
        max_concurrent: 16   # requests running at once
        max_queued: 64       # more wait here in arrival order; past both: HTTP 429
        cache_scope: docs    # optional: share prefix-cache blocks with tenants of this scope

A digest is `hash_key(key)` (`printf %s KEY | sha256sum`). Without a file, `Tenants.load()`
reads the environment: SPLITSERVE_TENANTS holds a path to such a file or the document itself;
SPLITSERVE_API_KEY holds one plain key for a single tenant "default" (hashed on load).

Each tenant's prompts are hashed into KV block ids under a salt of its own (its cache scope),
so one tenant's prompt never hits blocks another tenant's requests computed, and the time to a
first token says nothing about what others sent. Tenants that want to share prefixes (one
product's teams over the same system prompt) name the same `cache_scope`; a scope is never a
tenant's private one, whatever the names.

Limits count HTTP requests (a request with n=4 holds one slot) and are per router replica.

An optional `fairness` section turns on fair admission across tenants (router.vtc): every
router replica admits at most max_inflight sequences at once, in the order of the tenants'
virtual token counters (shared through Redis), or in arrival order with `order: fcfs`:

    fairness:
      order: vtc            # vtc | fcfs
      input_weight: 1       # per prompt token computed
      output_weight: 2      # per output token
      max_inflight: 64      # sequences this router keeps in the pools at once
      weights: {team-a: 2}  # shares (default 1): team-a is owed twice the service
      priorities: {team-a: 0}  # a tenant's best engine priority (0 = first)
      priority_levels: 8    # a request's `priority` is within [0, priority_levels)
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.admission import Gate, GateBusyError
from router.vtc import FairnessConfig

ENV_TENANTS = "SPLITSERVE_TENANTS"
ENV_API_KEY = "SPLITSERVE_API_KEY"


class TenantsConfigError(ValueError):
    """A tenants file or variable that cannot be used; the message names the field."""


class TenantBusyError(GateBusyError):
    """The tenant already has max_concurrent requests running and max_queued waiting."""


def priority_levels_of(tenants: Tenants | None) -> int:
    """How many engine priorities a request may ask for: [0, levels)."""
    if tenants is None or tenants.fairness is None:
        return FairnessConfig().priority_levels
    return tenants.fairness.priority_levels


def hash_key(key: str) -> str:
    """The hex SHA-256 digest a tenants file lists for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


# -- the file ---------------------------------------------------------------------------------


class _TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=128)
    keys: list[str] = Field(min_length=1)
    max_concurrent: int = Field(32, ge=1)
    max_queued: int = Field(128, ge=0)
    cache_scope: str | None = Field(None, min_length=1, max_length=128)

    @field_validator("keys")
    @classmethod
    def _digests(cls, keys: list[str]) -> list[str]:
        for k in keys:
            if len(k) != 64 or any(c not in "0123456789abcdefABCDEF" for c in k):
                raise ValueError(
                    "keys are SHA-256 hex digests (64 hex characters) of the API keys, not "
                    "the keys themselves: printf %s KEY | sha256sum"
                )
        return [k.lower() for k in keys]


class _FairnessSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    order: str = "vtc"
    input_weight: float = Field(1.0, gt=0)
    output_weight: float = Field(2.0, gt=0)
    max_inflight: int = Field(64, ge=1)
    weights: dict[str, float] = Field(default_factory=dict)
    priorities: dict[str, int] = Field(default_factory=dict)
    priority_levels: int = Field(8, ge=1, le=256)

    @field_validator("order")
    @classmethod
    def _order(cls, v: str) -> str:
        if v not in ("vtc", "fcfs"):
            raise ValueError(f"order must be vtc or fcfs, got {v!r}")
        return v


class _TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tenants: list[_TenantSpec] = Field(min_length=1)
    fairness: _FairnessSpec | None = None


def _fairness(spec: _FairnessSpec, names: set[str], source: str) -> FairnessConfig:
    """The section's cross-checks: tenants it names exist, weights are positive, priorities
    are within the levels."""
    for field_name, table in (("weights", spec.weights), ("priorities", spec.priorities)):
        for name in table:
            if name not in names:
                raise TenantsConfigError(
                    f"{source}: fairness.{field_name}.{name}: unknown tenant {name!r} "
                    f"(tenants: {', '.join(sorted(names))})"
                )
    for name, w in spec.weights.items():
        if not w > 0 or w != w or w == float("inf"):
            raise TenantsConfigError(
                f"{source}: fairness.weights.{name}: a share must be a positive number, got {w}"
            )
    for name, p in spec.priorities.items():
        if not 0 <= p < spec.priority_levels:
            raise TenantsConfigError(
                f"{source}: fairness.priorities.{name}: must be within "
                f"[0, {spec.priority_levels}), got {p}"
            )
    return FairnessConfig(
        order=spec.order, input_weight=spec.input_weight, output_weight=spec.output_weight,
        max_inflight=spec.max_inflight, weights=dict(spec.weights),
        priorities=dict(spec.priorities), priority_levels=spec.priority_levels,
    )  # fmt: skip


# -- admission ---------------------------------------------------------------------------------


class Tenant(Gate):
    """One tenant's admission: at most max_concurrent requests run; up to max_queued more wait
    in arrival order; any further one is refused (TenantBusyError).

    acquire() and release() pair up: every acquire that returns is matched by one release."""

    error = TenantBusyError

    def __init__(
        self, name: str, max_concurrent: int, max_queued: int, cache_scope: str | None = None
    ) -> None:
        super().__init__(max_concurrent, max_queued, what=f"tenant {name!r}")
        self.name = name
        self.cache_scope = cache_scope
        # The prefix (private, or scope) keeps a scope's salt apart from any tenant's own.
        self.cache_salt = f"scope:{cache_scope}" if cache_scope else f"tenant:{name}"

    @property
    def max_concurrent(self) -> int:
        return self.max_running


@dataclass(frozen=True)
class _Key:
    digest: bytes
    tenant: Tenant


class Tenants:
    def __init__(
        self,
        tenants: Iterable[tuple],
        fairness: FairnessConfig | None = None,
    ) -> None:
        """tenants: (name, key digests as hex, max_concurrent, max_queued[, cache_scope]).
        fairness: fair admission across tenants (None: each tenant's limits only)."""
        self.fairness = fairness
        self._by_name: dict[str, Tenant] = {}
        self._keys: list[_Key] = []
        for name, digests, max_concurrent, max_queued, *scope in tenants:
            if name in self._by_name:
                raise TenantsConfigError(f"tenant {name!r} is listed twice")
            t = Tenant(name, max_concurrent, max_queued, scope[0] if scope else None)
            self._by_name[name] = t
            for d in digests:
                raw = bytes.fromhex(d)
                if any(k.digest == raw for k in self._keys):
                    raise TenantsConfigError(f"tenant {name!r}: a key digest is listed twice")
                self._keys.append(_Key(raw, t))

    @classmethod
    def from_dict(cls, data: object, source: str = "tenants") -> Tenants:
        try:
            f = _TenantsFile.model_validate(data)
        except ValidationError as e:
            lines = [
                f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: "
                + err["msg"].removeprefix("Value error, ")
                for err in e.errors()
            ]
            raise TenantsConfigError(f"{source}: " + "; ".join(lines)) from None
        fair = None
        if f.fairness is not None:
            fair = _fairness(f.fairness, {t.name for t in f.tenants}, source)
        return cls(
            ((t.name, t.keys, t.max_concurrent, t.max_queued, t.cache_scope) for t in f.tenants),
            fair,
        )

    @classmethod
    def from_text(cls, text: str, source: str = "tenants") -> Tenants:
        """A YAML or JSON document (JSON is YAML)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TenantsConfigError(f"{source} is not valid YAML or JSON: {e}") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tenants:
        """From a file; with no path, from $SPLITSERVE_TENANTS (a path or the document) or
        $SPLITSERVE_API_KEY (one key, tenant "default")."""
        if path is not None:
            p = Path(path)
            try:
                text = p.read_text()
            except OSError as e:
                raise TenantsConfigError(f"cannot read tenants file {p}: {e.strerror}") from None
            return cls.from_text(text, str(p))
        env = os.environ.get(ENV_TENANTS, "").strip()
        if env:
            if "\n" not in env and Path(env).is_file():
                return cls.load(env)
            return cls.from_text(env, f"${ENV_TENANTS}")
        key = os.environ.get(ENV_API_KEY, "")
        if key:
            return cls([("default", [hash_key(key)], 32, 128)])
        raise TenantsConfigError(
            f"authentication is on but no tenants are configured: give a tenants file, set "
            f"${ENV_TENANTS} or ${ENV_API_KEY}, or turn auth off"
        )

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def tenant(self, name: str) -> Tenant:
        return self._by_name[name]

    def lookup(self, key: str | None) -> Tenant | None:
        """The tenant an API key belongs to. Every stored digest is compared, in constant time
        each, so the time taken says nothing about which key (if any) matched."""
        if not key:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = None
        for k in self._keys:
            if hmac.compare_digest(k.digest, digest):
                found = k.tenant
        return found
