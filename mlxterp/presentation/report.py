"""An interactive report of a patching result: one self-contained HTML file.

The page needs no network: the result travels as JSON inside the file, and a short script draws
it as SVG when the page opens. Hovering a cell (or a bar) shows the site, its token in both
prompts, the recovery with its float32 noise, and the raw metric values; a switch shows the
sites ranked instead of the grid; the prompts are printed with the differing tokens marked.

No plotting library: a library's offline bundle (plotly's is 3.5 MB) would dwarf a typical
result, and an SVG whose cells carry `data-site` attributes is easy to test in a browser.

Example:
    >>> write_html(result, "ioi-heads.html")
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from mlxterp.experiments.pipeline.results import site_label
from mlxterp.paths import output_path, write_atomically
from mlxterp.presentation.plots import color_limit, position_labels, title


def _payload(result) -> dict:
    """What the page's script draws: sites with labels, values and tooltips, and the layout."""
    over = list(result.over)
    column_axis = over[-1] if len(over) > 1 else None
    columns = result.axis_values(column_axis) if column_axis else []
    column_labels = (position_labels(result, columns)[0] if column_axis == "position"
                     else [str(c) for c in columns])
    row_axes = over[:-1] if column_axis else over
    rows = sorted({tuple(site[a] for a in row_axes) for site in result.sites})
    values = result.metric_values
    sites = []
    for i, site in enumerate(result.sites):
        lines = [site_label(result, site), f"recovery {result.mean[i]:.1f}%"]
        if result.noise is not None and result.method == "exact":
            lines[-1] += f" (float32 noise ±{result.noise[:, i].max():.2g} points)"
        if isinstance(site.get("position"), int):
            p = site["position"]
            clean, corrupted = result.tokens[0][p], result.corrupted_tokens[0][p]
            lines.append(f"token: {clean!r} (clean) / {corrupted!r} (corrupted)")
        if values is not None:
            raw = ", ".join(f"{v:.4g}" for v in values.patched[:, i])
            lines.append(f"{result.metric}: patched {raw}; clean {values.clean[0]:.4g}, "
                         f"corrupted {values.corrupted[0]:.4g}")
        if len(result.clean) > 1:
            lines.append("per pair: " + ", ".join(f"{v:.1f}%" for v in result.recovery[:, i]))
        sites.append({
            "row": rows.index(tuple(site[a] for a in row_axes)),
            "column": columns.index(site[column_axis]) if column_axis else 0,
            "value": float(result.mean[i]), "label": site_label(result, site), "tip": lines,
        })
    row_labels = [" ".join(f"{a[0].upper()}{v}" for a, v in zip(row_axes, row, strict=True))
                  for row in rows]
    return {"sites": sites, "rows": row_labels, "columns": column_labels,
            "limit": color_limit(result.mean), "bars": column_axis is None}


def _prompt_html(result) -> str:
    """Both prompts as token spans, the tokens where they differ marked."""
    if not result.tokens or not result.corrupted_tokens:
        return f"<p>{html.escape(result.clean[0])} → {html.escape(result.corrupted[0])}</p>"
    lines = []
    for name, tokens, other in (("clean", result.tokens[0], result.corrupted_tokens[0]),
                                ("corrupted", result.corrupted_tokens[0], result.tokens[0])):
        spans = "".join(
            f'<span class="token{" differ" if a != b else ""}">{html.escape(a)}</span>'
            for a, b in zip(tokens, other, strict=True))
        lines.append(f'<p class="prompt"><b>{name}</b> {spans}</p>')
    return "\n".join(lines)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 15px; font-weight: 600; max-width: 60em; }}
.meta {{ color: #666; }}
.prompt .token {{ white-space: pre; border: 1px solid #ddd; padding: 0 2px; margin-right: 1px; }}
.prompt .differ {{ background: #fde2e2; border-color: #c53030; font-weight: 600; }}
button {{ margin-right: .5em; }} button.on {{ font-weight: 700; }}
#tooltip {{ position: fixed; pointer-events: none; background: #fff; border: 1px solid #999;
  padding: 4px 8px; box-shadow: 0 1px 4px #0003; display: none; white-space: pre; }}
svg text {{ font-size: 10px; }}
</style></head><body>
<h1>{title}</h1>
<p class="meta">{meta}</p>
{prompts}
<p><button id="show-grid" class="on">grid</button><button id="show-ranking">ranking</button></p>
<div id="grid"></div><div id="ranking" style="display:none"></div>
<div id="tooltip"></div>
<script type="application/json" id="data">{data}</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const NS = "http://www.w3.org/2000/svg";
function color(v) {{  // diverging around 0: blue toward the donor, red away, white at 0
  const t = Math.max(-1, Math.min(1, v / data.limit));
  const [r, g, b] = t >= 0 ? [1 - 0.85 * t, 1 - 0.6 * t, 1 - 0.3 * t]
                           : [1 + 0.2 * t, 1 + 0.8 * t, 1 + 0.8 * t];
  return `rgb(${{Math.round(255 * r)}},${{Math.round(255 * g)}},${{Math.round(255 * b)}})`;
}}
const tip = document.getElementById("tooltip");
function hover(el, i) {{
  el.dataset.site = i;
  el.addEventListener("mouseenter", e => {{ tip.textContent = data.sites[i].tip.join("\\n");
    tip.style.display = "block";
    tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; }});
  el.addEventListener("mouseleave", () => {{ tip.style.display = "none"; }});
}}
function node(name, attrs, parent) {{
  const el = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  parent.appendChild(el); return el;
}}
function label(parent, x, y, text, anchor, rotate) {{
  const t = node("text", {{x, y, "text-anchor": anchor}}, parent);
  if (rotate) t.setAttribute("transform", `rotate(${{rotate}} ${{x}} ${{y}})`);
  t.textContent = text;
}}
function fit(svg, group) {{  // the drawing moved and the svg sized so that every label is inside it
  const box = group.getBBox();
  group.setAttribute("transform", `translate(${{4 - box.x}} ${{4 - box.y}})`);
  svg.setAttribute("width", Math.ceil(box.width + 8));
  svg.setAttribute("height", Math.ceil(box.height + 8));
}}
function drawGrid() {{
  const cell = data.sites.length > 5000 ? 6 : data.sites.length > 1000 ? 14 : 22, left = 70, top = 10;
  const height = data.bars ? 160 : data.rows.length * cell;
  const frame = node("svg", {{}}, document.getElementById("grid")), svg = node("g", {{}}, frame);
  data.sites.forEach((s, i) => {{
    let el;
    if (data.bars) {{
      const h = Math.min(Math.abs(s.value), data.limit) / data.limit * 75;
      el = node("rect", {{x: left + i * cell, y: s.value >= 0 ? top + 80 - h : top + 80, width: cell - 2,
                          height: Math.max(h, 1), fill: color(s.value)}}, svg);
      label(svg, left + i * cell + cell / 2, top + height + 12, s.label, "end", -60);
    }} else {{
      el = node("rect", {{x: left + s.column * cell, y: top + s.row * cell, width: cell, height: cell,
                          fill: color(s.value)}}, svg);
    }}
    hover(el, i);
  }});
  if (!data.bars && cell >= 10) {{
    data.rows.forEach((r, j) => label(svg, left - 4, top + j * cell + cell * 0.7, r, "end"));
    data.columns.forEach((c, j) => label(svg, left + j * cell + cell / 2, top + height + 8, c, "end", -60));
  }}
  fit(frame, svg);
}}
function drawRanking() {{
  const order = data.sites.map((s, i) => i).sort((a, b) => data.sites[b].value - data.sites[a].value);
  const shown = order.slice(0, 200), left = 200, width = 400, row = 16;
  const frame = node("svg", {{}}, document.getElementById("ranking")), svg = node("g", {{}}, frame);
  shown.forEach((i, k) => {{
    const s = data.sites[i], w = Math.min(Math.abs(s.value), data.limit) / data.limit * width / 2;
    label(svg, left - 6, k * row + 12, `${{k + 1}}. ${{s.label}}`, "end");
    const el = node("rect", {{x: s.value >= 0 ? left + width / 2 : left + width / 2 - w, y: k * row + 2,
                              width: Math.max(w, 1), height: row - 4, fill: color(s.value)}}, svg);
    label(svg, left + width + 6, k * row + 12, s.value.toFixed(1) + "%", "start");
    hover(el, i);
  }});
  document.getElementById("ranking").style.display = "";  // getBBox needs it laid out
  fit(frame, svg);
  document.getElementById("ranking").style.display = "none";
}}
function show(which) {{
  for (const name of ["grid", "ranking"]) {{
    document.getElementById(name).style.display = name === which ? "" : "none";
    document.getElementById("show-" + name).classList.toggle("on", name === which);
  }}
}}
document.getElementById("show-grid").onclick = () => show("grid");
document.getElementById("show-ranking").onclick = () => show("ranking");
drawGrid(); drawRanking();
document.body.dataset.ready = "true";
</script></body></html>
"""


def write_html(result, path: str | Path, overwrite: bool = False) -> Path:
    """Write `result` as one self-contained interactive HTML page (an existing file only with
    `overwrite=True`); returns the path.

    Example:
        >>> write_html(result, "report.html")
    """
    path = output_path(path, {".html", ".htm"}, overwrite)
    provenance = result.provenance
    meta = ", ".join(f"{key} {value}" for key, value in (
        ("model", provenance.get("model")), ("dtype", provenance.get("dtype")),
        ("mlxterp", provenance.get("mlxterp")), ("MLX", provenance.get("mlx"))) if value)
    data = json.dumps(_payload(result)).replace("</", "<\\/")  # no early end of the script tag
    page = _PAGE.format(title=html.escape(title(result)), meta=html.escape(meta),
                        prompts=_prompt_html(result), data=data)
    return write_atomically(path, lambda temporary: temporary.write_text(page, encoding="utf-8"))
