"""Allowlists: which resources an agent may call at all.

A *resource* is a full URL, ``scheme://host/path?query``. Scheme and host are case-insensitive in
URLs, so :func:`normalise_resource` lowers them before matching; the path and query stay
case-sensitive. A fragment never reaches the server and is dropped.

Patterns always match the whole URL, never a part of it: a regex ``api\\.openai\\.com`` does not
match ``https://evil.com/?api.openai.com``. Two syntaxes exist:

* ``regex``: Python regular expressions. ``^`` and ``$`` may be written but are implied. The regex
  sees the normalised URL, so write its scheme and host in lowercase.
* ``glob``: ``*`` matches any run of characters *including* ``/`` (``https://api.anthropic.com/*``
  matches ``https://api.anthropic.com/v1/messages``), ``?`` exactly one character, ``[abc]`` and
  ``[!abc]`` one character in or not in a set (``a-z`` ranges allowed; a ``]`` right after the
  opening ``[`` or ``[!`` is a member). Everything else is literal, dots and backslashes included;
  write ``[[]``, ``[*]`` or ``[?]`` for a literal ``[``, ``*`` or ``?``. A glob's scheme and host
  are lowered like the resource's.

An empty allowlist allows nothing: the firewall fails closed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from caracald.core.errors import ValidationError

#: Longer patterns are refused: no legitimate URL pattern needs more, and huge ones are costly to run.
MAX_PATTERN_LENGTH: Final = 2048

_CACHE_SIZE: Final = 4096


class PatternType(StrEnum):
    REGEX = "regex"
    GLOB = "glob"


def parse_pattern_type(value: PatternType | str) -> PatternType:
    """The pattern type named by ``value`` (case-insensitive), or a clear error."""
    if isinstance(value, PatternType):
        return value
    if isinstance(value, str):
        try:
            return PatternType(value.strip().lower())
        except ValueError:
            pass
    valid = ", ".join(t.value for t in PatternType)
    raise ValidationError(f"unknown pattern type {value!r}: use one of {valid}")


def _shown(text: str, limit: int = 80) -> str:
    """``repr`` of ``text``, shortened so an error stays one readable line."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def compile_pattern(pattern: str, pattern_type: PatternType | str) -> re.Pattern[str]:
    """Compile an allowlist or pricebook pattern into a regex anchored at both ends of the URL.

    Anchoring is built into the returned regex, so ``search``, ``match`` and ``fullmatch`` all
    demand a whole-URL match. Compiled patterns are cached.
    """
    kind = parse_pattern_type(pattern_type)
    if not isinstance(pattern, str):
        raise ValidationError(f"pattern must be a string, got {type(pattern).__name__}")
    if not pattern.strip():
        raise ValidationError("pattern is empty")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValidationError(
            f"pattern {_shown(pattern, 40)} is {len(pattern)} characters long; "
            f"the limit is {MAX_PATTERN_LENGTH}"
        )
    return _compile(pattern, kind)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compile(pattern: str, kind: PatternType) -> re.Pattern[str]:
    if kind is PatternType.GLOB:
        return re.compile(_glob_to_regex(pattern))
    return _anchor_regex(pattern)


# Global inline flags such as ``(?i)`` must stay at the very start once the pattern is wrapped.
_LEADING_FLAGS: Final = re.compile(r"(?:\(\?[aiLmsux]+\))+")


def _anchor_regex(pattern: str) -> re.Pattern[str]:
    try:
        # Compiled alone first so error positions refer to what the operator wrote.
        plain = re.compile(pattern)
    except re.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        raise ValidationError(f"invalid regex {_shown(pattern)}: {exc.msg}{where}") from None
    except (OverflowError, RecursionError) as exc:
        raise ValidationError(f"invalid regex {_shown(pattern)}: {exc}") from None
    flags = _LEADING_FLAGS.match(pattern)
    prefix = flags.group(0) if flags else ""
    body = pattern[len(prefix) :]
    # In verbose mode a trailing ``# comment`` would swallow the closing parenthesis.
    closing = "\n)" if plain.flags & re.VERBOSE else ")"
    return re.compile(f"{prefix}\\A(?:{body}{closing}\\Z")


def _host_part_end(pattern: str) -> int:
    """Index just past ``scheme://host`` in a glob, or 0 if it does not spell one out."""
    start = pattern.find("://")
    if start < 0:
        return 0
    start += 3
    # ``?`` is a wildcard in a glob; a query can only start at a literal ``[?]``.
    ends = [i for i in (pattern.find(c, start) for c in ("/", "[?]")) if i >= 0]
    return min(ends) if ends else len(pattern)


def _glob_class(content: str, pattern: str, position: int) -> str:
    items: list[str] = []
    k = 0
    while k < len(content):
        low = content[k]
        if k + 2 < len(content) and content[k + 1] == "-":
            high = content[k + 2]
            if low > high:
                raise ValidationError(
                    f"glob {_shown(pattern)} has a reversed range {low}-{high} at position {position + k}"
                )
            items.append(f"{re.escape(low)}-{re.escape(high)}")
            k += 3
        else:
            items.append(re.escape(low))
            k += 1
    return "".join(items)


def _glob_to_regex(pattern: str) -> str:
    host_end = _host_part_end(pattern)
    text = pattern[:host_end].lower() + pattern[host_end:]
    # Segments of single-character regexes, split at each run of ``*``.
    segments: list[list[str]] = [[]]
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "*":
            if segments[-1] or len(segments) == 1:
                segments.append([])
            i += 1
        elif c == "?":
            segments[-1].append(".")
            i += 1
        elif c == "[":
            j = i + 1
            negate = j < n and text[j] == "!"
            if negate:
                j += 1
            start = j
            if j < n and text[j] == "]":
                j += 1
            while j < n and text[j] != "]":
                j += 1
            if j >= n:
                raise ValidationError(
                    f"glob {_shown(pattern)} has an unterminated '[' at position {i}: "
                    "close it with ']' or write '[[]' for a literal '['"
                )
            members = _glob_class(text[start:j], pattern, start)
            segments[-1].append(f"[{'^' if negate else ''}{members}]")
            i = j + 1
        else:
            segments[-1].append(re.escape(c))
            i += 1
    head, *rest = ("".join(s) for s in segments)
    if not rest:
        return f"(?s:\\A{head}\\Z)"
    *middle, tail = rest
    # Each middle segment has a fixed length, so its first occurrence is as good as any later one;
    # atomic groups commit to it and keep many stars from backtracking exponentially.
    body = head + "".join(f"(?>.*?{m})" for m in middle) + ".*" + tail
    return f"(?s:\\A{body}\\Z)"


_URL: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)", re.DOTALL)


def normalise_resource(url: str) -> str:
    """The URL with its scheme and host in lowercase and any fragment dropped.

    Raises :class:`ValidationError` for anything that is not ``scheme://host...``, or that contains
    whitespace or control characters (which no well-formed URL does).
    """
    if not isinstance(url, str):
        raise ValidationError(f"resource must be a URL string, got {type(url).__name__}")
    if any(ch.isspace() or ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in url):
        raise ValidationError(f"resource {_shown(url)} contains whitespace or control characters")
    m = _URL.fullmatch(url)
    if m is None:
        raise ValidationError(f"resource {_shown(url)} is not a full URL: expected scheme://host/path")
    scheme, authority, rest = m.groups()
    userinfo, at, hostport = authority.rpartition("@")
    host = hostport[: hostport.find("]") + 1] if hostport.startswith("[") else hostport.partition(":")[0]
    if not host:
        raise ValidationError(f"resource {_shown(url)} has no host")
    path_and_query = rest.partition("#")[0]
    return f"{scheme.lower()}://{userinfo}{at}{hostport.lower()}{path_and_query}"


@dataclass(frozen=True, slots=True)
class AllowlistRule:
    """One allowed pattern. The pattern is checked when the rule is made, not when it is used."""

    rule_id: str
    pattern: str
    pattern_type: PatternType
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rule_id, str) or not self.rule_id.strip():
            raise ValidationError("allowlist rule id is empty")
        kind = parse_pattern_type(self.pattern_type)
        object.__setattr__(self, "pattern_type", kind)
        object.__setattr__(self, "_regex", compile_pattern(self.pattern, kind))

    def matches(self, resource: str) -> bool:
        """Whether the whole URL matches, after normalising its scheme and host."""
        return self._matches_normalised(normalise_resource(resource))

    def _matches_normalised(self, resource: str) -> bool:
        return self._regex.fullmatch(resource) is not None


class Allowlist:
    """An ordered set of rules; a resource is allowed when any rule matches it."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Iterable[AllowlistRule] = ()) -> None:
        ordered = tuple(rules)
        seen: set[str] = set()
        for rule in ordered:
            if rule.rule_id in seen:
                raise ValidationError(f"allowlist rule id {rule.rule_id!r} appears twice")
            seen.add(rule.rule_id)
        self._rules = ordered

    @property
    def rules(self) -> tuple[AllowlistRule, ...]:
        return self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self) -> Iterator[AllowlistRule]:
        return iter(self._rules)

    def match(self, resource: str) -> AllowlistRule | None:
        """The first rule, in the given order, matching ``resource``; None when nothing does.

        Raises :class:`ValidationError` when ``resource`` is not a full URL.
        """
        normalised = normalise_resource(resource)
        for rule in self._rules:
            if rule._matches_normalised(normalised):
                return rule
        return None

    def allows(self, resource: str) -> bool:
        return self.match(resource) is not None
