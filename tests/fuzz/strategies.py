"""Hypothesis strategies for genloom.v1 requests, derived from the message descriptors.

`MessageStrategies.message(descriptor)` walks a message's fields generically (every scalar type, enums, nested and
repeated messages, maps, oneofs), so a field added to a proto is fuzzed without touching this file. Values lean on
the hostile end: empty and ~100 KB strings, NUL / bidi / combining / emoji characters, negative, huge, NaN, inf,
subnormal and -0.0 numbers, enum numbers no .proto defines (proto3 enums are open: any int32 goes on the wire),
oversized repeated fields and maps. Fields whose name says what they hold get targeted values on top: paths
(`..`, symlinks out of a root, 300-character components), webhook URLs to internal addresses, training data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

FD = FieldDescriptor

# Characters that break naive handling: NUL and controls, bidi overrides, combining marks, zero-width and BOM,
# astral-plane emoji (4 UTF-8 bytes; a ZWJ family), non-characters, chat-template specials, Jinja and format syntax.
ODD_CHARACTERS = (
    "\x00",
    "\x1b",
    "\x7f",
    "\r\n",
    "\u202e",
    "\u200f",
    "\u0301",
    "\u0336",
    "\u200b",
    "\ufeff",
    "\ufffd",
    "\uffff",
    "\U0010ffff",
    "\U0001f600",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "<|im_end|>",
    "<|im_start|>",
    "{{ 7*7 }}",
    "{% for x in range(99999999) %}",
    "%s%n",
    "'\"\\",
)

# float32 fields: the values a sampler chokes on (the smallest subnormal, just under FLT_MIN, -0.0, the overflow
# edge) next to the ordinary ones.
NASTY_FLOAT32 = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    1e-45,
    1.4e-45,
    1e-40,
    1.1754942e-38,
    1.1754944e-38,
    1e-30,
    1e-8,
    0.5,
    2.0,
    1e8,
    3.4028235e38,
    -3.4028235e38,
    math.inf,
    -math.inf,
    math.nan,
)
NASTY_FLOAT64 = (
    *NASTY_FLOAT32,
    5e-324,
    2.2250738585072014e-308,
    1e-300,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    1e300,
)

INT_RANGES: Mapping[int, tuple[int, int]] = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
# Enum numbers no genloom .proto defines: negative, just past the defined ones, the int32 extremes.
UNKNOWN_ENUM_NUMBERS = (-1, 7, 99, 2**31 - 1, -(2**31))

# Webhook destinations a server must refuse by default: loopback in its spellings, private ranges, link-local
# cloud metadata, unspecified, multicast, IPv6 forms, non-HTTP schemes; plus malformed URLs.
INTERNAL_URLS = (
    "http://127.0.0.1/hook",
    "http://127.1:6379/",
    "http://localhost:6379/",
    "http://LOCALHOST./x",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0177.0.0.1/",
    "http://0.0.0.0:80/",
    "http://[::1]:8080/",
    "http://[::ffff:127.0.0.1]/",
    "http://[fe80::1%25lo]/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://100.100.100.200/latest/meta-data/",
    "http://224.0.0.1/",
    "http://user:pass@127.0.0.1/",
    "http://example.com@127.0.0.1/",
    "https://127.0.0.1:1/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "redis://127.0.0.1:6379/0",
    "ftp://10.0.0.1/",
    "http://",
    "http:///x",
    "http://[::1",
    "//127.0.0.1/",
    "javascript:alert(1)",
    "https://example.com/" + "a" * 5000,
)

# Field names (anywhere in a request) that hold a path or a name the server may treat as one.
PATH_FIELDS = frozenset({"path", "model", "base_model", "adapter", "file"})
# Path components that probe traversal, symlinks, expansion, encodings and the OS name limit (255 bytes).
PATH_COMPONENTS = (
    "..",
    ".",
    "",
    "~",
    "~root",
    "%2e%2e",
    "..\\..",
    "a" * 300,
    "\U0001f600" * 70,
    "nul\x00byte",
    "tiny-llama",
    "train.jsonl",
    "links",
    "outside",
    "etc",
    "passwd",
    "proc",
    "self",
    "environ",
)


@dataclass(frozen=True)
class Vocabulary:
    """Values a fuzz session's servers know (so generated requests get past name lookups to the code behind
    them), and hostile values that point at this session's fixtures (roots, symlinks out of them)."""

    #: Names and ids the server accepts: model and adapter names, job/sweep/event ids, hyperparameter names.
    names: Sequence[str] = ()
    #: Paths: valid ones, traversals out of each root, symlinks, over-long and missing ones.
    paths: Sequence[str] = ()
    #: Webhook URLs on top of INTERNAL_URLS (e.g. the fuzz server's own address).
    urls: Sequence[str] = ()
    #: Training data bodies: valid JSONL, broken JSONL, binary.
    jsonl: Sequence[bytes] = ()
    #: Field name -> strategy, for fields that need values of their own (checked before PATH_FIELDS etc.).
    extra: Mapping[str, st.SearchStrategy[Any]] = field(default_factory=dict)


def huge_text(max_chars: int = 100_000) -> st.SearchStrategy[str]:
    """A short drawn string repeated out to between 1 K and `max_chars` characters (drawing 100 KB of random
    text would blow Hypothesis's data budget; the size, not the variety, is what a big input tests)."""
    return st.builds(
        lambda seed, n: (seed * (n // len(seed) + 1))[:n],
        st.text(
            alphabet=st.sampled_from(("a", " ", "\u00e9", "\U0001f600", "\x00", "\u202e", ".")), min_size=1, max_size=6
        ),
        st.sampled_from((1_025, 4_097, 16_385, 65_537, max_chars)),
    )


def odd_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Short text from all of Unicode but surrogates (which protobuf can't encode), salted with ODD_CHARACTERS."""
    pieces = st.one_of(st.sampled_from(ODD_CHARACTERS), st.text(st.characters(exclude_categories=("Cs",)), max_size=8))
    return st.lists(pieces, max_size=max(1, max_size // 8)).map("".join).map(lambda s: s[:max_size] if s else s)


def path_strategy(vocabulary: Vocabulary) -> st.SearchStrategy[str]:
    generated = st.builds(
        lambda absolute, parts: ("/" if absolute else "") + "/".join(parts),
        st.booleans(),
        st.lists(st.sampled_from(PATH_COMPONENTS), min_size=1, max_size=8),
    )
    rooted = st.builds(
        lambda root, parts: "/".join([root, *parts]),
        st.sampled_from(vocabulary.paths or ("/",)),
        st.lists(st.sampled_from(PATH_COMPONENTS), min_size=0, max_size=4),
    )
    options = [generated, rooted]
    if vocabulary.paths:
        options.insert(0, st.sampled_from(vocabulary.paths))
    return st.one_of(*options)


def url_strategy(vocabulary: Vocabulary) -> st.SearchStrategy[str]:
    hosts = st.sampled_from(("127.0.0.1", "localhost", "[::1]", "10.1.2.3", "169.254.169.254", "0", "example.com"))
    built = st.builds(
        lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
        st.sampled_from(("http", "https", "HTTP", "file", "gopher")),
        hosts,
        st.sampled_from(("", ":0", ":1", ":22", ":6379", ":65535", ":99999", ":-1", ":a")),
        odd_text(20),
    )
    return st.one_of(st.sampled_from((*INTERNAL_URLS, *vocabulary.urls)), built)


class MessageStrategies:
    """Strategies for any genloom.v1 message, built from its descriptor.

    `message(d, sparse=True)` sets few fields (about one in eight): merged onto a valid request it mutates a
    couple of fields and leaves the rest valid, which reaches the code behind the first validation check.
    `sparse=False` sets about half the fields: whole-message garbage.
    """

    MAX_DEPTH = 5
    #: Lengths of oversized repeated fields and maps: past every batch limit genloom has (64, 100, 256, 4096).
    OVERSIZED = (65, 101, 257, 1_025, 5_000)
    #: Bound on the bytes one oversized repeated field may add (the request must stay under gRPC's size limits).
    OVERSIZED_BYTES = 1_500_000

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        self._cache: dict[tuple[str, bool, bool, int], st.SearchStrategy[Message]] = {}
        self._paths = path_strategy(vocabulary)
        self._urls = url_strategy(vocabulary)

    # -- scalars ----------------------------------------------------------------------------------------------------

    def text(self, small: bool) -> st.SearchStrategy[str]:
        options: list[st.SearchStrategy[str]] = [st.just(""), odd_text()]
        if self.vocabulary.names:
            options.append(st.sampled_from(self.vocabulary.names))
        if not small:
            options.append(huge_text())
        return st.one_of(*options)

    def binary(self, small: bool) -> st.SearchStrategy[bytes]:
        options: list[st.SearchStrategy[bytes]] = [st.binary(max_size=64)]
        if self.vocabulary.jsonl:
            options.insert(0, st.sampled_from(self.vocabulary.jsonl))
        if not small:
            options.append(huge_text().map(lambda s: s.encode()))
        return st.one_of(*options)

    @staticmethod
    def integer(kind: int) -> st.SearchStrategy[int]:
        lo, hi = INT_RANGES[kind]
        edges = sorted(
            {v for v in (0, 1, 2, 3, 16, 64, 1024, 2**31 - 1, 2**32 - 1, 2**63 - 1, -1, lo, hi) if lo <= v <= hi}
        )
        return st.one_of(st.sampled_from(edges), st.integers(lo, hi))

    @staticmethod
    def enum(fd: FieldDescriptor) -> st.SearchStrategy[int]:
        defined = [v.number for v in fd.enum_type.values]
        return st.one_of(
            st.sampled_from(defined), st.sampled_from(UNKNOWN_ENUM_NUMBERS), st.integers(-(2**31), 2**31 - 1)
        )

    def scalar(self, fd: FieldDescriptor, small: bool) -> st.SearchStrategy[Any]:
        targeted = self._targeted(fd)
        generic = self._generic_scalar(fd, small)
        return st.one_of(targeted, generic) if targeted is not None else generic

    def _targeted(self, fd: FieldDescriptor) -> st.SearchStrategy[Any] | None:
        extra = self.vocabulary.extra
        for key in (fd.full_name, fd.name):
            if key in extra:
                return extra[key]
        if fd.type == FD.TYPE_STRING and fd.name in PATH_FIELDS:
            return self._paths
        if fd.type == FD.TYPE_STRING and fd.name == "url":
            return self._urls
        return None

    def _generic_scalar(self, fd: FieldDescriptor, small: bool) -> st.SearchStrategy[Any]:
        kind = fd.type
        if kind == FD.TYPE_STRING:
            return self.text(small)
        if kind == FD.TYPE_BYTES:
            return self.binary(small)
        if kind == FD.TYPE_BOOL:
            return st.booleans()
        if kind == FD.TYPE_ENUM:
            return self.enum(fd)
        if kind == FD.TYPE_FLOAT:
            return st.one_of(st.sampled_from(NASTY_FLOAT32), st.floats(width=32))
        if kind == FD.TYPE_DOUBLE:
            return st.one_of(st.sampled_from(NASTY_FLOAT64), st.floats())
        if kind in INT_RANGES:
            return self.integer(kind)
        raise TypeError(f"no strategy for field {fd.full_name} of type {kind}")

    # -- messages ---------------------------------------------------------------------------------------------------

    def message(
        self, descriptor: Descriptor, *, sparse: bool = False, small: bool = False, depth: int = 0
    ) -> st.SearchStrategy[Message]:
        key = (descriptor.full_name, sparse, small, depth)
        if key not in self._cache:
            self._cache[key] = self._build(descriptor, sparse, small, depth)
        return self._cache[key]

    def _build(self, descriptor: Descriptor, sparse: bool, small: bool, depth: int) -> st.SearchStrategy[Message]:
        cls = GetMessageClass(descriptor)
        # proto3 `optional` fields sit in a synthetic one-field oneof: treat them as plain fields.
        real_oneofs = [o for o in descriptor.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)]
        in_oneof = {f.name for o in real_oneofs for f in o.fields}
        plain = [f for f in descriptor.fields if f.name not in in_oneof]
        deep_enough = depth >= self.MAX_DEPTH
        setters = {f.name: self._field(f, sparse, small, depth) for f in descriptor.fields}
        # Presence shrinks towards "unset" (0): minimal examples name only the fields that matter.
        odds = 7 if sparse else 1

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            msg = cls()
            for fd in plain:
                if deep_enough and fd.type == FD.TYPE_MESSAGE:
                    continue
                if draw(st.integers(0, odds)) == odds:
                    setters[fd.name](msg, draw)
            for oneof in real_oneofs:
                choice = draw(st.sampled_from([None, *oneof.fields]))
                if choice is not None and not (deep_enough and choice.type == FD.TYPE_MESSAGE):
                    setters[choice.name](msg, draw)
            return msg

        return build()

    def setter(self, fd: FieldDescriptor) -> Callable[[Message, st.DrawFn], None]:
        """Sets `fd` on a message to a drawn value (a whole generated message for a message field)."""
        return self._field(fd, sparse=False, small=False, depth=1)

    def _field(
        self, fd: FieldDescriptor, sparse: bool, small: bool, depth: int
    ) -> Callable[[Message, st.DrawFn], None]:
        name = fd.name
        if fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]

            def set_map(msg: Message, draw: st.DrawFn) -> None:
                keys, values = self.scalar(key_fd, True), self.scalar(value_fd, small)
                if not small and draw(st.integers(0, 4)) == 4:  # an oversized map: many small entries
                    n = draw(st.sampled_from(self.OVERSIZED))
                    getattr(msg, name).update({f"k{i}": "v" for i in range(n)})
                else:
                    getattr(msg, name).update(draw(st.dictionaries(keys, values, max_size=3)))

            return set_map

        if fd.type == FD.TYPE_MESSAGE:

            def element() -> st.SearchStrategy[Any]:
                return self.message(fd.message_type, sparse=sparse, small=small, depth=depth + 1)

        else:

            def element() -> st.SearchStrategy[Any]:
                return self.scalar(fd, small)

        if fd.is_repeated:

            def set_repeated(msg: Message, draw: st.DrawFn) -> None:
                target = getattr(msg, name)
                if not small and draw(st.integers(0, 4)) == 4:
                    # Oversized: one small element many times (drawing thousands would be slow and shrink badly).
                    if fd.type == FD.TYPE_MESSAGE:
                        one = draw(self.message(fd.message_type, sparse=True, small=True, depth=depth + 1))
                        size = max(one.ByteSize(), 1)
                    else:
                        one = draw(self.scalar(fd, True))
                        size = len(one) if isinstance(one, str | bytes) else 8
                    n = min(draw(st.sampled_from(self.OVERSIZED)), max(1, self.OVERSIZED_BYTES // (size + 4)))
                    target.extend([one] * n)
                else:
                    target.extend(draw(st.lists(element(), max_size=3)))

            return set_repeated

        if fd.type == FD.TYPE_MESSAGE:

            def set_message(msg: Message, draw: st.DrawFn) -> None:
                getattr(msg, name).CopyFrom(draw(element()))

            return set_message

        def set_scalar(msg: Message, draw: st.DrawFn) -> None:
            setattr(msg, name, draw(element()))

        return set_scalar


def field_paths(descriptor: Descriptor, depth: int = 0) -> list[tuple[FieldDescriptor, ...]]:
    """Every field reachable from `descriptor` (through nested messages and repeated ones' first element), as
    descriptor paths: the places a single-field mutation can hit."""
    out: list[tuple[FieldDescriptor, ...]] = []
    for fd in descriptor.fields:
        out.append((fd,))
        is_map = fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry
        if fd.type == FD.TYPE_MESSAGE and not is_map and depth < MessageStrategies.MAX_DEPTH - 1:
            out += [(fd, *sub) for sub in field_paths(fd.message_type, depth + 1)]
    return out


def mutated(strategies: MessageStrategies, base: Message | Sequence[Message]) -> st.SearchStrategy[Message]:
    """Requests for one RPC, drawn from four kinds:
    - a valid request as is (one of `base`);
    - a valid request with one or two fields, anywhere in its tree, set to a hostile value (most draws: most of
      a server's code sits behind its first validation check, and this reaches every field equally);
    - a valid request merged with a sparse generated message (a few fields at once, repeated ones appended);
    - whole-message garbage.
    """
    bases = list(base) if isinstance(base, Sequence) else [base]
    descriptor = bases[0].DESCRIPTOR
    paths = field_paths(descriptor)

    def copy(start: Message) -> Message:
        out = type(start)()
        out.CopyFrom(start)
        return out

    def merge(start: Message, patch: Message) -> Message:
        out = copy(start)
        out.MergeFrom(patch)
        return out

    @st.composite
    def one_field(draw: st.DrawFn) -> Message:
        msg = copy(draw(st.sampled_from(bases)))
        for _ in range(draw(st.integers(1, 2))):
            path = draw(st.sampled_from(paths))
            target = msg
            for fd in path[:-1]:
                if fd.is_repeated:
                    items = getattr(target, fd.name)
                    target = items[draw(st.integers(0, len(items) - 1))] if len(items) else items.add()
                else:
                    target = getattr(target, fd.name)
            last = path[-1]
            if last.is_repeated:
                container = getattr(target, last.name)
                if hasattr(container, "clear"):
                    container.clear()
                else:
                    del container[:]
            else:
                target.ClearField(last.name)
            strategies.setter(last)(target, draw)
        return msg

    if not paths:
        return st.sampled_from(bases)
    valid_plus = st.builds(merge, st.sampled_from(bases), strategies.message(descriptor, sparse=True))
    garbage = strategies.message(descriptor, sparse=False)
    return st.one_of(st.sampled_from(bases), one_field(), one_field(), one_field(), valid_plus, garbage)
