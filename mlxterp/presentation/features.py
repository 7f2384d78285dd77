"""Feature dashboards of an SAE as one self-contained HTML page, searchable by feature.

Like the patching report, the page needs no network: the dashboards travel as JSON inside the
file and a short script draws them. A search box keeps the features whose number matches, or
that fire on or promote a token containing the text typed. Each feature shows its frequency,
its activation histogram (SVG), its top contexts with every token shaded by its activation (the
top token outlined; hover a token for its value), and the tokens its decoder direction promotes
and suppresses.

Example:
    >>> write_features_html(dashboards, "features.html")
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from mlxterp.paths import output_path, write_atomically

_SCRIPT = """
const data = JSON.parse(document.getElementById('data').textContent);
const list = document.getElementById('features');
const esc = s => s.replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
function histogram(h) {
  if (!h.counts.length) return '<p>never fires on these tokens</p>';
  const top = Math.max(...h.counts), w = 300 / h.counts.length;
  const bars = h.counts.map((c, i) => `<rect x="${i * w}" y="${60 - 60 * c / top}"
    width="${w - 1}" height="${60 * c / top}"><title>${h.edges[i].toFixed(2)}-${h.edges[i + 1].toFixed(2)}:
    ${c}</title></rect>`);
  return `<svg class="hist" width="300" height="62">${bars.join('')}</svg>
    <div class="axis">0 &hellip; ${h.edges[h.edges.length - 1].toFixed(2)}</div>`;
}
function context(c, peak) {
  return '<div class="context">' + c.tokens.map((t, i) => {
    const a = c.activations[i], alpha = peak > 0 ? Math.max(0, a) / peak : 0;
    return `<span class="tok${i === c.top ? ' top' : ''}"
      style="background: rgba(230, 120, 20, ${alpha.toFixed(3)})"
      title="${a}">${esc(t).replace(/\\n/g, '&#8629;')}</span>`;
  }).join('') + '</div>';
}
function card(b) {
  const logits = l => l.map(([t, v]) => `<code>${esc(t)}</code> ${v.toFixed(2)}`).join(', ');
  return `<section class="feature" data-feature="${b.feature}"><h2>Feature ${b.feature}</h2>
    <p>fires on ${(100 * b.frequency).toFixed(3)}% of tokens;
    largest activation ${b.max_activation.toFixed(3)}</p>${histogram(b.histogram)}
    <h3>Top contexts</h3>${b.contexts.map(c => context(c, b.max_activation)).join('')}
    <h3>Promotes</h3><p>${logits(b.promoted)}</p><h3>Suppresses</h3><p>${logits(b.suppressed)}</p></section>`;
}
function show() {
  const query = document.getElementById('search').value.trim().toLowerCase();
  const shown = data.boards.filter(b => !query || String(b.feature) === query
    || b.contexts.some(c => c.tokens[c.top].toLowerCase().includes(query))
    || b.promoted.some(([t]) => t.toLowerCase().includes(query)));
  list.innerHTML = shown.map(card).join('') || '<p>no feature matches</p>';
  document.getElementById('count').textContent = `${shown.length} of ${data.boards.length} features`;
}
document.getElementById('search').addEventListener('input', show);
show();
"""

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 2em; max-width: 60em; }
.feature { border-top: 1px solid #ccc; padding: 0.5em 0; }
.context { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 0.2em 0; }
.tok { border-radius: 2px; }
.tok.top { outline: 1px solid #b04000; }
.hist rect { fill: #e07814; }
.axis { font-size: 11px; color: #666; width: 300px; }
input { font-size: 16px; padding: 0.3em; width: 20em; }
"""


def write_features_html(dashboards, path: str | Path, overwrite: bool = False) -> Path:
    """Write `dashboards` (a `FeatureDashboards`) as one self-contained page.

    Raises:
        OutputPathError: a path that is not .html, or exists without overwrite.

    Example:
        >>> write_features_html(dashboards, "features.html")
    """
    path = output_path(path, {".html", ".htm"}, overwrite)
    payload = json.dumps(dashboards.to_json()).replace("</", "<\\/")
    title = html.escape(f"{dashboards.sae} — {dashboards.model}")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title><style>{_STYLE}</style></head>
<body><h1>{title}</h1>
<p>Over {dashboards.tokens:,} held-out tokens. Search by feature number, or by a token a feature fires on or
promotes: <input id="search" placeholder="e.g. 1234 or ' the'"> <span id="count"></span></p>
<div id="features"></div>
<script type="application/json" id="data">{payload}</script>
<script>{_SCRIPT}</script></body></html>
"""
    return write_atomically(path, lambda p: p.write_text(page, encoding="utf-8"))
