"""report.html: one self-contained page (figures and thumbnails embedded as data URLs) with everything
evaluate.py measured: summary with intervals, calibration, reject option, confusion matrix, per-class table and
the most confident mistakes."""
from __future__ import annotations

import base64
import html
import io
import os
from typing import Any

from utils.data.images import load_pil_rgb
from utils.files import atomic_write
from utils.trust.summary import trust_lines

FIGURES = (("confusion_matrix.png", "Confusion matrix"), ("reliability.png", "Reliability diagram"),
           ("coverage.png", "Coverage vs accuracy"))
STYLE = """body{font-family:sans-serif;margin:24px;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:first-child{text-align:left}figure{display:inline-block;margin:8px;vertical-align:top}
figure img.fig{max-width:520px}.thumbs figure{width:120px;font-size:11px;text-align:center}
.thumbs img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;border:1px solid #ccc}
.note{color:#666;font-size:13px}"""
# The page marks itself when every image has decoded: headless-browser tests read data-figures-ok.
CHECK = """<script>window.addEventListener('load',function(){var im=[].slice.call(document.images);
var ok=im.filter(function(i){return i.complete&&i.naturalWidth>0}).length;
document.body.setAttribute('data-figures-ok',ok+'/'+im.length)});</script>"""


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumbnail(path: str, size: int = 96) -> str | None:
    """A PNG data URL of the image scaled to ``size`` px, or None when it cannot be read."""

    try:
        im = load_pil_rgb(path)  # the decoder training used: upright, 16-bit scaled
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    except Exception:
        return None
    return _data_url(buf.getvalue())


def _pct(v: float) -> str:
    return f"{v:.1f}"


def _ci(entry: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    lo, hi = entry["ci"]
    return f"{entry['value'] * scale:.{digits}f} <span class=note>({lo * scale:.{digits}f}-{hi * scale:.{digits}f})</span>"


def render_report(result: dict[str, Any], files: dict[str, str], max_mistakes: int = 24) -> str:
    """The HTML text of the report for an evaluate.evaluate() result whose figures are in ``files``."""
    m, trust = result["metrics"], result["trust"]
    iv, cal, rej = trust["intervals"], trust["calibration"], trust["reject"]
    esc = html.escape

    tta = f", test-time augmentation: {esc(m['tta'])}" if m.get("tta") else ""
    skipped = f", {m['skipped']} unreadable skipped" if m["skipped"] else ""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>evaluation of {esc(os.path.basename(m['model']))}"
             f"</title><style>{STYLE}</style>{CHECK}</head><body>",
             f"<h1>{esc(os.path.basename(m['model']))} on {esc(m['data'])}</h1>",
             f"<p>{esc(m['kind'])}, {m['images']} images{tta}{skipped}.</p>",
             "<h2>Summary (95% intervals: Wilson, MOVER for balanced accuracy and macro-F1)</h2><table><tr><th>metric</th><th>value (95% CI)</th></tr>",
             f"<tr><td>top-1 %</td><td>{_ci(iv['top1'])}</td></tr>",
             f"<tr><td>balanced accuracy %</td><td>{_ci(iv['balanced_acc'])}</td></tr>",
             f"<tr><td>macro-F1</td><td>{_ci(iv['macro_f1'], digits=3)}</td></tr>",
             f"<tr><td>top-5 %</td><td>{_pct(m['top5'])}</td></tr><tr><td>loss</td><td>{m['loss']:.4f}</td></tr></table>",
             "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in trust_lines(trust)) + "</ul>"]
    if m.get("compare"):
        c = m["compare"]
        parts.append(f"<p>Compared with {esc(c['model_b'])} on the same {c['n']} images: top-1 difference "
                     f"{c['top1']['value']:+.2f} points (95% CI {c['top1']['ci'][0]:+.2f} to {c['top1']['ci'][1]:+.2f}).</p>")
    parts.append("<h2>Figures</h2>")
    for name, caption in FIGURES:
        with open(files[name], "rb") as f:
            parts.append(f"<figure><img class=fig alt='{esc(caption)}' src='{_data_url(f.read())}'>"
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append(f"<p class=note>Calibration: ECE {cal['ece_before']:.2f}% -> {cal['ece_after']:.2f}% at temperature "
                 f"{cal['temperature']:.3f}, {esc(cal['source'])}. Reject target {100 * rej['target_accuracy']:g}% "
                 "accuracy.</p>")
    parts.append("<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall (95% CI)</th><th>F1</th>"
                 "<th>support</th></tr>")
    for r in result["per_class"]:
        rec = iv["recall"].get(r["class"])
        recall = _ci(rec, digits=3) if rec else f"{r['recall']:.3f}"
        parts.append(f"<tr><td>{esc(r['class'])}</td><td>{r['precision']:.3f}</td>"
                     f"<td>{recall}</td><td>{r['f1']:.3f}</td>"
                     f"<td>{r['support']}</td></tr>")
    parts.append("</table>")
    shown = result["mistakes"][:max_mistakes]
    parts.append(f"<h2>Most confident mistakes ({len(shown)} of {len(result['mistakes'])})</h2><div class=thumbs>")
    for k in shown:
        url = _thumbnail(k["file"])
        img = f"<img alt='{esc(os.path.basename(k['file']))}' src='{url}'>" if url else "<p>(unreadable)</p>"
        conf = k.get("calibrated_confidence", k["confidence"])
        parts.append(f"<figure>{img}<figcaption>true: {esc(k['true'])}<br>predicted: {esc(k['predicted'])}<br>"
                     f"confidence {100 * conf:.1f}%</figcaption></figure>")
    parts.append("</div></body></html>\n")
    return "\n".join(parts)


def write_report(result: dict[str, Any], files: dict[str, str], out_html: str) -> str:
    """Write report.html atomically; returns its path."""
    text = render_report(result, files)
    atomic_write(out_html, lambda tmp: open(tmp, "w", encoding="utf-8").write(text))
    return out_html
