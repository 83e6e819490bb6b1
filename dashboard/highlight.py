"""Tokens coloured by a score in [0, 1] as escaped HTML (model text is never trusted as markup)."""
from __future__ import annotations

import html


#: the one colour meaning of true (green) and false (red) on every page (figures.TRUTH_COLOURS uses these)
TRUE_RGB, FALSE_RGB = (40, 170, 80), (220, 60, 60)


def colour(score: float) -> str:
    """Red (0) through white (0.5) to green (1), as an rgba background."""
    s = min(max(float(score), 0.0), 1.0)
    if s < 0.5:
        return "rgba({}, {}, {}, ".format(*FALSE_RGB) + f"{0.75 * (0.5 - s) * 2:.2f})"
    return "rgba({}, {}, {}, ".format(*TRUE_RGB) + f"{0.75 * (s - 0.5) * 2:.2f})"


def coloured_tokens(tokens: list[str], scores: list[float], marked: list[bool] | None = None, label: str = "score"
                    ) -> str:
    """One ``<span>`` per token, background by score, hover title with the value; ``marked`` tokens underlined."""
    marked = marked or [False] * len(tokens)
    spans = []
    for tok, s, m in zip(tokens, scores, marked):
        style = f"background:{colour(s)};border-radius:3px;padding:1px 0;white-space:pre-wrap"
        if m:
            style += ";text-decoration:underline;text-decoration-thickness:2px"
        spans.append(f'<span title="{label} {float(s):.3f}" style="{style}">{html.escape(tok)}</span>')
    return '<div style="font-family:monospace;line-height:1.9">' + "".join(spans) + "</div>"
