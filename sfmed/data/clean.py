"""Cleaning (``clean=true``): Unicode normalisation, HTML stripping, whitespace, length filters.

Each step first checks, at C speed, whether the text needs it at all: most texts pass through
untouched, which keeps cleaning cheap next to tokenization.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable

# Only real HTML tags are removed: "<140/90" or "a<b" in medical text stay.
_TAGS = (
    "a|abbr|b|big|blockquote|body|br|caption|center|cite|code|col|colgroup|dd|del|div|dl|dt|em|"
    "figcaption|figure|font|footer|h[1-6]|head|header|hr|html|i|img|ins|label|li|link|mark|meta|"
    "nav|o:p|ol|p|pre|q|s|section|small|source|span|strike|strong|sub|sup|table|tbody|td|tfoot|"
    "th|thead|title|tr|tt|u|ul|article|aside|main|input|button|form|iframe|svg|path|wbr|nobr"
)
_BLOCK = {
    "br",
    "p",
    "div",
    "li",
    "tr",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "table",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "blockquote",
    "pre",
    "section",
    "article",
    "header",
    "footer",
    "hr",
    "title",
    "caption",
    "figure",
    "figcaption",
    "main",
    "aside",
    "nav",
}
_ATTRS = r"""(?:\s+[A-Za-z_:][\w:.-]*(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'<>=`]+))?)*\s*"""
_TAG_RE = re.compile(rf"</?({_TAGS}){_ATTRS}/?>", re.IGNORECASE)
_DROP_BLOCK_RE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.S | re.I)
_ENTITY_RE = re.compile(r"&(?:[A-Za-z]{2,8}|#\d{1,7}|#[xX][0-9a-fA-F]{1,6});")
_HTML_HINT = re.compile(rf"</?(?:{_TAGS})\b|<!--|<script|<style|&(?:[A-Za-z]{{2,8}}|#\w+);", re.I)

# Characters the whitespace step removes or replaces (one character-class scan is fast).
_WS_CHARS = re.compile(
    "[\r\t\x00-\x08\x0b-\x1f\x7f\u00a0\u2000-\u200f\u2028\u2029\u202f\u205f\u2060\u3000\ufeff]"
)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u2060\ufeff]")
_HSPACE = re.compile("[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_LINE_EDGES = re.compile(r" *\n *")
_BLANKS = re.compile(r"\n{3,}")


def strip_html(text: str) -> str:
    """Remove script/style blocks, comments and known HTML tags (block tags become line
    breaks) and unescape entities such as ``&nbsp;``/``&lt;``."""
    if not _HTML_HINT.search(text):
        return text
    text = _DROP_BLOCK_RE.sub("", text)
    text = _TAG_RE.sub(lambda m: "\n" if m.group(1).lower() in _BLOCK else "", text)
    if "&" in text:
        text = _ENTITY_RE.sub(lambda m: html.unescape(m.group(0)), text)
    return text


def normalize_whitespace(text: str) -> str:
    """``\\r\\n``/``\\r`` -> ``\\n``; drop control/zero-width chars; collapse runs of horizontal
    space (incl. the ideographic space) to one space; strip line ends; at most one blank line."""
    if not (
        _WS_CHARS.search(text)
        or "  " in text
        or " \n" in text
        or "\n " in text
        or "\n\n\n" in text
        or text[:1].isspace()
        or text[-1:].isspace()
    ):
        return text
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u2028", "\n").replace("\u2029", "\n")
    text = _CONTROL.sub("", text)
    text = _HSPACE.sub(" ", text)
    text = _LINE_EDGES.sub("\n", text)
    text = _BLANKS.sub("\n\n", text)
    return text.strip()


def make_cleaner(
    unicode_form: str = "NFC",
    html_: bool = True,
    whitespace: bool = True,
    min_chars: int = 0,
    max_chars: int = 0,
) -> Callable[[str], tuple[str, str | None]]:
    """``clean(text) -> (text, drop reason or None)``; reasons: empty, too_short, too_long."""
    form = None if unicode_form in (None, "none") else unicode_form
    is_normalized, normalize = unicodedata.is_normalized, unicodedata.normalize

    def clean(text: str) -> tuple[str, str | None]:
        if form is not None and not is_normalized(form, text):
            text = normalize(form, text)
        if html_ and ("<" in text or "&" in text):
            text = strip_html(text)
        if whitespace:
            text = normalize_whitespace(text)
        n = len(text)
        if n == 0 or (not whitespace and not text.strip()):
            return text, "empty"
        if n < min_chars:
            return text, "too_short"
        if max_chars and n > max_chars:
            return text, "too_long"
        return text, None

    return clean
