"""Text a user wrote (labels, study names, options, a result file's strings), made safe to show on
a terminal: control characters become visible escapes, as ``repr`` writes them, so a label holding
``ESC]0;title BEL`` or ``ESC[2J`` is shown as written and never retitles or clears the screen.

Every place that prints such text to a terminal passes it through :func:`printable` (Rich markup is
escaped separately, where markup is interpreted).
"""
from __future__ import annotations

import re

__all__ = ["printable", "IMPROVING_MARK"]

#: Beside a figure whose training had not peaked (best checkpoint at the last epoch), in every view.
IMPROVING_MARK = "↑"

# C0 and C1 controls, DEL, and the invisible format characters that reorder or hide text
# (bidirectional overrides and isolates, zero-width characters, line and paragraph separators).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _escape(match: re.Match) -> str:
    return repr(match.group())[1:-1]   # none of these is printable, so repr escapes each


def printable(text: object, newlines: bool = False) -> str:
    """``str(text)`` with every control character as an escape (``\\x1b``, ``\\n``, ``\\u202e``);
    with ``newlines``, line breaks are kept (a table cell of several lines)."""
    return (_CONTROL_BUT_NEWLINE if newlines else _CONTROL).sub(_escape, str(text))
