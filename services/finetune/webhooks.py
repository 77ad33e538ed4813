"""Webhook calls when a job or sweep ends: POST the record as proto3 JSON, signed, retried with backoff.

A webhook that keeps failing only costs a warning event; it never changes the job's outcome.

Destinations are checked twice, because a webhook is a request the server makes on a client's behalf (SSRF):
- at CreateJob / CreateSweep (`url_problem`): http(s) only, no credentials in the URL, and a host that is not
  `localhost`, a cloud metadata name or a literal address in a blocked range (in any spelling getaddrinfo
  accepts: `2130706433`, `0x7f.1`, `[::ffff:127.0.0.1]`);
- at every send (`deliver`): the name is resolved again and every address it resolves to must be allowed (a
  name may be re-pointed after the job was created: DNS rebinding); the connection then goes to the checked
  address itself, never through a second lookup, and redirects are not followed.
Blocked: loopback, private (RFC 1918, fc00::/7), link-local (169.254/16 with the metadata address, fe80::/10),
CGNAT (100.64/10), multicast, unspecified, reserved and every other non-global range, also when embedded in an
IPv6 address (IPv4-mapped, 6to4, NAT64). `WebhookPolicy.allowed` (GENLOOM_FINETUNE_WEBHOOK_ALLOWED_HOSTS) lets an
operator name private destinations that are fine (host names or CIDRs).

What a failed delivery tells the client is only that it failed: the reason (status code, connection refused,
timeout) goes to the server log, so webhooks cannot be used to probe which internal ports answer.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Genloom-Signature"
EVENT_HEADER = "X-Genloom-Event"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Names that reach the machine itself or a cloud provider's instance metadata service.
METADATA_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
        "metadata.oraclecloud.com",
    }
)
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, RFC 6052 / 8215).
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


class Refused(Exception):
    """A destination the policy does not allow; the message is for the server log."""


@dataclass(frozen=True)
class WebhookPolicy:
    """Which destinations webhooks may reach beyond public addresses."""

    # Host names (exact, case-insensitive) whose resolved addresses are trusted whatever they are.
    names: frozenset[str] = frozenset()
    # Networks whose addresses are allowed even though they are not public.
    networks: tuple[IPNetwork, ...] = field(default=())

    @classmethod
    def parse(cls, items: Iterable[str]) -> WebhookPolicy:
        """From setting items: "hooks.internal", "127.0.0.1", "10.0.0.0/8", "::1". ValueError on a bad CIDR."""
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for item in items:
            text = item.strip().strip("[]").lower()
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                if "/" in text:
                    raise ValueError(f"{item!r} is not a network (CIDR) or a host name") from None
                names.add(text.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def allows_name(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.names

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in net for net in self.networks if net.version == address.version)


def blocked_reason(address: IPAddress) -> str | None:
    """Why a webhook may not go to `address` (without an allow-list entry), or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or (address.sixtofour if address.sixtofour else None)
        if embedded is None and any(address in net for net in _NAT64):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            inner = blocked_reason(embedded)
            if inner is not None:
                return f"{inner} (inside an IPv6 address)"
    for reason, hit in (
        ("a loopback address", address.is_loopback),
        ("an unspecified address", address.is_unspecified),
        ("a link-local address", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
    ):
        if hit:
            return reason
    if not address.is_global:  # CGNAT 100.64/10, documentation and benchmarking ranges, ...
        return "a non-public address"
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address `host` spells, if it is a literal in any form a resolver accepts; else None (a name)."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and all(ch in "0123456789abcdefxABCDEFX." for ch in text) and text[-1] != ".":
        # Legacy IPv4 spellings getaddrinfo still honours: 2130706433, 0x7f000001, 0177.0.0.1, 127.1.
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _refused_name(host: str) -> str | None:
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return "names this machine (localhost)"
    if name in METADATA_NAMES:
        return "names a cloud metadata service"
    return None


def url_problem(url: str, policy: WebhookPolicy) -> str | None:
    """Why `url` cannot be a webhook (shown to the client: it is their own URL), or None. Checks the URL's form
    and, for a literal host, its address; names are checked when they are resolved at send time."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL (bad host or port)"
    if parts.scheme.lower() not in ("http", "https"):
        return f"scheme {parts.scheme[:16]!r}: must be http or https"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@): use webhook.secret to have calls signed"
    host = parts.hostname
    if not host:
        return "has no host"
    if port == 0:
        return "has an invalid port"
    if policy.allows_name(host):
        return None
    refused = _refused_name(host)
    if refused is not None:
        return f"{refused}; webhooks may not call it (GENLOOM_FINETUNE_WEBHOOK_ALLOWED_HOSTS)"
    address = literal_address(host)
    if address is not None and not policy.allows_address(address):
        reason = blocked_reason(address)
        if reason is not None:
            return f"is {reason}; webhooks may not call it (GENLOOM_FINETUNE_WEBHOOK_ALLOWED_HOSTS)"
    return None


def resolve_destination(url: str, policy: WebhookPolicy) -> tuple[str, str, IPAddress]:
    """(URL to connect to, Host header, address): the URL with its host replaced by the one checked address it
    resolved to, so the HTTP client makes no lookup of its own. Raises Refused."""
    problem = url_problem(url, policy)
    if problem is not None:
        raise Refused(problem)
    parts = urlsplit(url)
    host = parts.hostname or ""
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        raise Refused(f"{host} does not resolve: {err}") from None
    addresses: list[IPAddress] = []
    for info in infos:
        raw = str(info[4][0]).split("%", 1)[0]
        address = ipaddress.ip_address(raw)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise Refused(f"{host} resolves to no address")
    if not policy.allows_name(host):
        for address in addresses:  # every one: a resolver may hand out any of them on the next lookup
            reason = None if policy.allows_address(address) else blocked_reason(address)
            if reason is not None:
                raise Refused(f"{host} resolves to {address}, {reason}")
    chosen = addresses[0]
    literal = f"[{chosen}]" if chosen.version == 6 else str(chosen)
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    target = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = parts.netloc.rsplit("@", 1)[-1]
    return target, host_header, chosen


def signature(secret: str, body: bytes) -> str:
    """The X-Genloom-Signature value: sha256=<hex HMAC-SHA256 of the body with the secret>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(
    url: str,
    secret: str,
    event: str,
    body: bytes,
    *,
    policy: WebhookPolicy | None = None,
    attempts: int = 5,
    backoff: float = 1.0,
    timeout: float = 10.0,
) -> bool:
    """POST `body` to `url` (after `attempts` tries with delays backoff, 2*backoff, ...); whether a try got a
    2xx answer. Why it failed is logged, never returned: callers show clients only that it failed."""
    policy = policy or WebhookPolicy()
    headers = {"Content-Type": "application/json", EVENT_HEADER: event, "User-Agent": "genloom-webhook/1"}
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, body)
    problem = "not called"
    # trust_env=False: an HTTP(S)_PROXY from the environment would make its own lookup of the name.
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for attempt in range(attempts):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                target, host_header, _ = resolve_destination(url, policy)
            except Refused as err:
                problem = f"refused: {err}"
                break  # a policy refusal does not change by retrying soon
            extensions = {"sni_hostname": urlsplit(url).hostname or ""} if target.startswith("https") else {}
            try:
                answer = client.post(
                    target, content=body, headers={**headers, "Host": host_header}, extensions=extensions
                )
            except httpx.HTTPError as err:
                problem = f"{type(err).__name__}: {err}"
                continue
            if 200 <= answer.status_code < 300:
                return True
            problem = f"HTTP {answer.status_code}"
    logger.warning("webhook %s (%s) failed after %d attempt(s): %s", _loggable(url), event, attempts, problem)
    return False


def _loggable(url: str) -> str:
    """The URL without any credentials (older records may hold some)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
