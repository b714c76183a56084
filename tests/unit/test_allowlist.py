from __future__ import annotations

import fnmatch
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caracald.core.allowlist import (
    MAX_PATTERN_LENGTH,
    Allowlist,
    AllowlistRule,
    PatternType,
    compile_pattern,
    normalise_resource,
    parse_pattern_type,
)
from caracald.core.errors import ValidationError


def rule(pattern: str, kind: PatternType | str = PatternType.GLOB, rule_id: str = "r1") -> AllowlistRule:
    return AllowlistRule(rule_id=rule_id, pattern=pattern, pattern_type=kind)  # type: ignore[arg-type]


# -- anchoring ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.com/?api.openai.com",
        "https://api.openai.com.evil.com/",
        "https://evil.com/api.openai.com",
        "xhttps://api.openai.com",
    ],
)
def test_regex_matches_whole_url_only(url: str) -> None:
    regex = compile_pattern(r"https://api\.openai\.com", PatternType.REGEX)
    assert regex.search(url) is None
    assert regex.match(url) is None
    assert not rule(r"https://api\.openai\.com", "regex").matches(url)


def test_regex_substring_pattern_does_not_match_a_url_containing_it() -> None:
    assert not rule(r"api\.openai\.com", "regex").matches("https://evil.com/?api.openai.com")


def test_regex_with_explicit_anchors_keeps_working() -> None:
    r = rule(r"^https://api\.openai\.com/v1/.*$", "regex")
    assert r.matches("https://api.openai.com/v1/chat/completions")
    assert not r.matches("https://api.openai.com/v2/chat")


def test_regex_dollar_does_not_accept_trailing_newline() -> None:
    regex = compile_pattern(r"^https://a\.com/x$", "regex")
    assert regex.search("https://a.com/x\n") is None


def test_regex_alternation_is_anchored_as_a_whole() -> None:
    r = rule(r"https://a\.com/.*|https://b\.com/.*", "regex")
    assert r.matches("https://b.com/x")
    assert not r.matches("https://evil.com/?https://b.com/x")
    assert compile_pattern(r"a|b", "regex").search("xb") is None


def test_regex_leading_global_flags_are_kept() -> None:
    r = rule(r"(?i)https://api\.openai\.com/V1/.*", "regex")
    assert r.matches("https://api.openai.com/v1/chat")


def test_verbose_regex_with_trailing_comment() -> None:
    r = rule("(?x) https://api\\.openai\\.com/ .*   # the whole API", "regex")
    assert r.matches("https://api.openai.com/v1/models")
    assert not r.matches("https://evil.com/")


# -- globs -------------------------------------------------------------------------------------------


def test_glob_star_crosses_slashes() -> None:
    r = rule("https://api.anthropic.com/*")
    assert r.matches("https://api.anthropic.com/v1/messages")
    assert r.matches("https://api.anthropic.com/")
    assert not r.matches("https://api.anthropic.com")
    assert not r.matches("https://api.anthropic.com.evil.com/v1/messages")


def test_glob_dot_is_literal() -> None:
    r = rule("https://api.openai.com/*")
    assert not r.matches("https://apixopenai.com/v1")
    assert not r.matches("https://api.openaiXcom/v1")


def test_glob_question_mark_is_exactly_one_character() -> None:
    r = rule("https://a.com/v?/x")
    assert r.matches("https://a.com/v1/x")
    assert not r.matches("https://a.com/v/x")
    assert not r.matches("https://a.com/v12/x")


def test_glob_classes() -> None:
    r = rule("https://a.com/v[12]/*")
    assert r.matches("https://a.com/v1/x")
    assert r.matches("https://a.com/v2/x")
    assert not r.matches("https://a.com/v3/x")
    neg = rule("https://a.com/v[!12]/*")
    assert neg.matches("https://a.com/v3/x")
    assert not neg.matches("https://a.com/v1/x")
    ranged = rule("https://a.com/v[0-9]")
    assert ranged.matches("https://a.com/v7")
    assert not ranged.matches("https://a.com/vx")


def test_glob_class_specials_are_literal() -> None:
    assert rule("https://a.com/[]]").matches("https://a.com/]")
    assert rule("https://a.com/[!]]").matches("https://a.com/x")
    assert not rule("https://a.com/[!]]").matches("https://a.com/]")
    assert rule("https://a.com/[-a]").matches("https://a.com/-")
    assert rule("https://a.com/[a-]").matches("https://a.com/-")
    assert rule("https://a.com/[^]").matches("https://a.com/^")
    assert rule("https://a.com/[\\]").matches("https://a.com/\\")
    assert rule("https://a.com/[[]x").matches("https://a.com/[x")
    assert rule("https://a.com/[*]").matches("https://a.com/*")
    assert not rule("https://a.com/[*]").matches("https://a.com/x")


def test_glob_regex_metacharacters_are_literal() -> None:
    r = rule("https://a.com/(x)+$|{1}\\d")
    assert r.matches("https://a.com/(x)+$|{1}\\d")
    assert not r.matches("https://a.com/xx")


def test_glob_query_is_case_sensitive_but_host_is_not() -> None:
    r = rule("https://API.Example.com/Path[?]Key=*")
    assert r.matches("https://api.example.com/Path?Key=1")
    assert r.matches("HTTPS://api.EXAMPLE.com/Path?Key=1")
    assert not r.matches("https://api.example.com/path?Key=1")
    assert not r.matches("https://api.example.com/Path?key=1")


def test_many_stars_do_not_backtrack_catastrophically() -> None:
    r = rule("https://a.com/" + "*a" * 40 + "*b")
    assert not r.matches("https://a.com/" + "a" * 5000)


_GLOB_ALPHABET = st.sampled_from([*"ab/.*?", "[ab]", "[!a]", "[a-b]"])


@given(parts=st.lists(_GLOB_ALPHABET, max_size=8), text=st.text(alphabet="ab/.", max_size=12))
def test_glob_agrees_with_fnmatch(parts: list[str], text: str) -> None:
    pattern = "".join(parts) or "a"
    ours = compile_pattern(pattern, PatternType.GLOB).search(text) is not None
    assert ours == fnmatch.fnmatchcase(text, pattern)


# -- invalid patterns --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(PatternType))
@pytest.mark.parametrize("pattern", ["", "   "])
def test_empty_pattern_is_refused(pattern: str, kind: PatternType) -> None:
    with pytest.raises(ValidationError, match="pattern is empty"):
        compile_pattern(pattern, kind)


def test_invalid_regex_names_the_reason_and_position() -> None:
    with pytest.raises(ValidationError, match=r"invalid regex 'https://\(a': missing \), .* at position 8"):
        compile_pattern("https://(a", "regex")


@pytest.mark.parametrize("pattern", ["a{99999999999}", "(" * 1000 + ")" * 1000])
def test_pathological_regex_is_a_validation_error(pattern: str) -> None:
    with pytest.raises(ValidationError, match="invalid regex"):
        compile_pattern(pattern, "regex")


@pytest.mark.parametrize(("pattern", "position"), [("https://a.com/[ab", 14), ("[!", 0), ("x[]", 1)])
def test_unterminated_glob_class_is_refused(pattern: str, position: int) -> None:
    with pytest.raises(ValidationError, match=rf"unterminated '\[' at position {position}"):
        compile_pattern(pattern, "glob")


def test_reversed_glob_range_is_refused() -> None:
    with pytest.raises(ValidationError, match="reversed range z-a"):
        compile_pattern("https://a.com/[z-a]", "glob")


def test_unknown_pattern_type_lists_valid_ones() -> None:
    with pytest.raises(ValidationError, match=r"unknown pattern type 'wildcard': use one of regex, glob"):
        compile_pattern("https://a.com/*", "wildcard")
    with pytest.raises(ValidationError, match="unknown pattern type"):
        rule("https://a.com/*", "wildcard")


def test_pattern_type_is_case_insensitive() -> None:
    assert parse_pattern_type(" GLOB ") is PatternType.GLOB
    assert rule("https://a.com/*", "Regex").pattern_type is PatternType.REGEX


def test_overlong_pattern_is_refused() -> None:
    compile_pattern("a" * MAX_PATTERN_LENGTH, "glob")
    with pytest.raises(ValidationError, match="2049 characters long; the limit is 2048"):
        compile_pattern("a" * (MAX_PATTERN_LENGTH + 1), "glob")


def test_compiled_patterns_are_cached() -> None:
    first = compile_pattern("https://cached.example/*", "glob")
    assert compile_pattern("https://cached.example/*", PatternType.GLOB) is first
    assert isinstance(first, re.Pattern)


# -- resources ---------------------------------------------------------------------------------------


def test_normalise_lowers_scheme_and_host_only() -> None:
    assert normalise_resource("HTTPS://API.OpenAI.com/V1/Chat?Q=A") == "https://api.openai.com/V1/Chat?Q=A"
    assert normalise_resource("https://User:Pw@Host.COM:8443/x") == "https://User:Pw@host.com:8443/x"
    assert normalise_resource("https://[2001:DB8::1]:443/x") == "https://[2001:db8::1]:443/x"


def test_normalise_drops_fragment() -> None:
    assert normalise_resource("https://a.com/x?y=1#frag") == "https://a.com/x?y=1"


@pytest.mark.parametrize(
    "url",
    ["api.openai.com/v1", "/v1/chat", "https:///v1", "https://user@/x", "file:///etc/passwd", "", "https://"],
)
def test_normalise_refuses_url_without_scheme_or_host(url: str) -> None:
    with pytest.raises(ValidationError):
        normalise_resource(url)


@pytest.mark.parametrize(
    "url", ["https://a.com/x y", "https://a.com/x\n", "https://a.com/\x00", "https://a.com/\t"]
)
def test_normalise_refuses_whitespace_and_control_characters(url: str) -> None:
    with pytest.raises(ValidationError, match="whitespace or control"):
        normalise_resource(url)


def test_host_is_case_insensitive_path_is_not() -> None:
    r = rule("https://api.openai.com/v1/*")
    assert r.matches("HTTPS://API.OPENAI.COM/v1/chat")
    assert not r.matches("https://api.openai.com/V1/chat")
    regex = rule(r"https://api\.openai\.com/v1/.*", "regex")
    assert regex.matches("https://Api.OpenAI.com/v1/chat")


# -- allowlist ---------------------------------------------------------------------------------------


def test_empty_allowlist_allows_nothing() -> None:
    empty = Allowlist([])
    assert not empty.allows("https://api.openai.com/v1/chat/completions")
    assert empty.match("https://api.openai.com/") is None
    assert len(empty) == 0


def test_first_matching_rule_wins_in_given_order() -> None:
    broad = rule("https://api.openai.com/*", rule_id="broad")
    narrow = rule("https://api.openai.com/v1/*", rule_id="narrow")
    assert Allowlist([broad, narrow]).match("https://api.openai.com/v1/x") is broad
    assert Allowlist([narrow, broad]).match("https://api.openai.com/v1/x") is narrow
    assert Allowlist([narrow, broad]).match("https://api.openai.com/v2/x") is broad


def test_allowlist_allows_and_denies() -> None:
    allowlist = Allowlist(
        [
            rule("https://api.anthropic.com/*", rule_id="anthropic"),
            rule(r"https://api\.openai\.com/v1/(chat/completions|embeddings)", "regex", rule_id="openai"),
        ]
    )
    assert allowlist.allows("https://api.anthropic.com/v1/messages")
    assert allowlist.allows("https://api.openai.com/v1/embeddings")
    assert not allowlist.allows("https://api.openai.com/v1/images/generations")
    assert not allowlist.allows("https://evil.com/?https://api.anthropic.com/")
    assert [r.rule_id for r in allowlist] == ["anthropic", "openai"]


def test_allowlist_refuses_malformed_resource() -> None:
    with pytest.raises(ValidationError, match="not a full URL"):
        Allowlist([rule("*")]).allows("api.openai.com/v1")


def test_duplicate_rule_ids_are_refused() -> None:
    with pytest.raises(ValidationError, match="appears twice"):
        Allowlist([rule("https://a.com/*"), rule("https://b.com/*")])


def test_rule_validates_its_pattern_and_id() -> None:
    with pytest.raises(ValidationError, match="unterminated"):
        rule("https://a.com/[")
    with pytest.raises(ValidationError, match="rule id is empty"):
        rule("https://a.com/*", rule_id=" ")


def test_rules_compare_by_value() -> None:
    assert rule("https://a.com/*", "glob") == rule("https://a.com/*", PatternType.GLOB)
    assert hash(rule("https://a.com/*")) == hash(rule("https://a.com/*"))
