"""Render the plugin's HTML: an edit's view, a run's gallery, the recent edits.

Plain HTML and CSS, no script; every text from a record (a prompt is user text) goes through
:func:`html.escape`, every link is built here from ids (URL-encoded), and only http(s) links leave
the page.
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import urlencode

from airflow_provider_kontext.plugins.media import describe
from airflow_provider_kontext.plugins.records import Edit

STYLE = """
body{font-family:system-ui,sans-serif;margin:12px;color:#222;background:#fff}
h1{font-size:18px;margin:0 0 8px} a{color:#1a56b0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px;background:#fafafa}
.pair{display:flex;gap:4px;align-items:center}.pair figure{margin:0;text-align:center;font-size:11px}
.pair img{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
.big img{width:min(46vw,640px);height:auto;max-height:70vh}
.st{font-weight:600;padding:0 4px;border-radius:3px}.st-succeeded{background:#d7f5dd}
.st-failed,.st-canceled,.st-aborted,.st-timeout,.st-error,.st-upstream_failed{background:#f9d6d6}
.meta{font-size:12px;margin:4px 0;word-break:break-word}.meta td{padding:1px 6px;vertical-align:top}
.pages a,.pages b{margin-right:6px} form{margin:6px 0} .muted{color:#777}
"""

#: Content security policy of every page: its own images and inline style only, no script.
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'"


def page(title: str, body: str) -> str:
    """Return a whole page."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def link(root: str, route: str, **params: Any) -> str:
    """Return a link inside the plugin: ``root`` (where the app is mounted) + ``route`` + query."""
    query = urlencode({k: v for k, v in params.items() if v is not None and v != ""})
    return escape(f"{root}/{route}" + (f"?{query}" if query else ""), quote=True)


def _image_link(root: str, edit: Edit, side: str, n: int, size: str) -> str:
    key = edit.key
    return link(
        root,
        "image",
        dag_id=key.dag_id,
        run_id=key.run_id,
        task_id=key.task_id,
        map_index=key.map_index,
        edit=edit.number,
        side=side,
        n=n,
        size=size,
    )


def _figure(root: str, edit: Edit, side: str, n: int, location: Any, size: str) -> str:
    where = location if isinstance(location, str) else None
    reason = describe(where, expired=edit.urls_expired() and side == "output")
    caption = "before" if side == "input" else "after"
    if reason in ("inline", "missing", "expired"):
        # No request for what cannot be shown: say why in place of the image.
        inner = f"<div class='muted' style='width:160px;height:160px;background:#eee'>{escape(reason)}</div>"
    else:
        full = _image_link(root, edit, side, n, "full")
        inner = (
            f"<a href='{full}' target='_blank' rel='noopener'>"
            f"<img src='{_image_link(root, edit, side, n, size)}' alt='{escape(caption)}'></a>"
        )
    return f"<figure>{inner}{escape(caption)}</figure>"


def pair(root: str, edit: Edit, size: str = "thumb") -> str:
    """Render the input and every output side by side (or what stands in for them)."""
    figures = [_figure(root, edit, "input", 0, edit.summary.get("input_image"), size)]
    outputs = edit.outputs()
    figures += [_figure(root, edit, "output", n, out, size) for n, out in enumerate(outputs)]
    if not outputs:
        figures.append(f"<figure><div class='muted'>no output ({escape(edit.status)})</div></figure>")
    return f"<div class='pair'>{''.join(figures)}</div>"


def _status(edit: Edit) -> str:
    status = edit.status
    return f"<span class='st st-{escape(status, quote=True)}'>{escape(status)}</span>"


def _external(url: Any, text: str) -> str:
    if isinstance(url, str) and url.lower().startswith(("https://", "http://")):
        target = escape(url, quote=True)
        return f"<a href='{target}' target='_blank' rel='noopener noreferrer'>{escape(text)}</a>"
    return ""


def details(edit: Edit) -> str:
    """Render the facts of one edit as a table: prompt, model, seed, inputs, times, status, link."""
    s = edit.summary
    rows: list[tuple[str, str]] = [("status", _status(edit))]
    if not edit.finished:
        rows.append(("", f"no result recorded (task {escape(str(edit.task_state or 'unknown'))})"))
    for label, name in (("prompt", "prompt"), ("revised prompt", "revised_prompt"), ("model", "model")):
        if s.get(name) is not None:
            rows.append((label, escape(str(s[name]))))
    seed = s.get("seed")
    rows.append(
        ("seed", escape(str(seed)) if seed is not None else "<span class='muted'>not reported</span>")
    )
    rows.append(("input", escape(str(s.get("input_image") or "-"))))
    if isinstance(s.get("predict_time"), int | float):
        rows.append(("predict time", f"{float(s['predict_time']):.1f} s"))
    for label, name in (("created", "created_at"), ("completed", "completed_at")):
        if s.get(name):
            rows.append((label, escape(str(s[name]))))
    for n, out in enumerate(edit.outputs()):
        rows.append((f"output {n + 1}", escape(out if not out.startswith("data:") else "data:...")))
    if s.get("urls_expire_at"):
        word = "expired" if edit.urls_expired() else "until"
        rows.append(("Replicate copy", f"{word} {escape(str(s['urls_expire_at']))}"))
    if s.get("id"):
        rows.append(
            ("prediction", escape(str(s["id"])) + " " + _external(s.get("web_url"), "open on Replicate"))
        )
    cells = "".join(f"<tr><td class='muted'>{label}</td><td>{value}</td></tr>" for label, value in rows)
    return f"<table class='meta'>{cells}</table>"


def edit_page(root: str, edits: list[Edit], title: str) -> str:
    """Render a task instance's view: each of its edits large, with its facts."""
    if not edits:
        return page(
            title, f"<h1>{escape(title)}</h1><p class='muted'>This task recorded no FLUX.1 Kontext edit.</p>"
        )
    first = edits[0].key
    gallery = link(root, "gallery", dag_id=first.dag_id, run_id=first.run_id)
    parts = [f"<h1>{escape(title)}</h1><p><a href='{gallery}' target='_top'>All edits of this run</a></p>"]
    for edit in edits:
        parts.append(
            f"<div class='card big'><b>{escape(edit.name)}</b>{pair(root, edit, 'full')}{details(edit)}</div>"
        )
    return page(title, "".join(parts))


def card(root: str, edit: Edit) -> str:
    """One edit in a gallery: before/after thumbnails, name, status, prompt, a link to its view."""
    key = edit.key
    view = link(
        root, "edit", dag_id=key.dag_id, run_id=key.run_id, task_id=key.task_id, map_index=key.map_index
    )
    prompt = str(edit.summary.get("prompt") or "")
    short = prompt if len(prompt) <= 140 else prompt[:139] + "\u2026"
    return (
        f"<div class='card'>{pair(root, edit)}<div class='meta'><a href='{view}'>{escape(edit.name)}</a> "
        f"{_status(edit)} <span class='muted'>{escape(key.task_id)}</span><br>{escape(short)}</div></div>"
    )


def _options(name: str, chosen: str | None, values: list[str]) -> str:
    opts = "".join(
        f"<option value='{escape(v, quote=True)}'{' selected' if v == chosen else ''}>{escape(v)}</option>"
        for v in values
    )
    return f"<select name='{name}'><option value=''>all</option>{opts}</select>"


def pager(root: str, route: str, params: dict[str, Any], current: int, pages: int) -> str:
    """Links to the other pages (first, neighbours, last)."""
    shown = sorted({1, pages, *range(max(1, current - 2), min(pages, current + 2) + 1)})
    items = [
        f"<b>{n}</b>" if n == current else f"<a href='{link(root, route, **params, page=n)}'>{n}</a>"
        for n in shown
    ]
    return f"<div class='pages'>Page: {' '.join(items)}</div>"


def gallery_page(
    root: str,
    dag_id: str,
    run_id: str,
    shown: list[Edit],
    *,
    total: int,
    matching: int,
    tasks: list[str],
    statuses: list[str],
    task: str | None,
    status: str | None,
    current: int,
    pages: int,
) -> str:
    """Render a run's gallery: filters, one page of cards, the pager."""
    title = f"Edits of {dag_id} / {run_id}"
    form = (
        f"<form method='get' action='{escape(root, quote=True)}/gallery'>"
        f"<input type='hidden' name='dag_id' value='{escape(dag_id, quote=True)}'>"
        f"<input type='hidden' name='run_id' value='{escape(run_id, quote=True)}'>"
        f"task {_options('task', task, tasks)} status {_options('status', status, statuses)} "
        f"<button type='submit'>Filter</button></form>"
    )
    params = {"dag_id": dag_id, "run_id": run_id, "task": task, "status": status}
    count = f"<p class='muted'>{matching} of {total} edits</p>"
    cards = "".join(card(root, edit) for edit in shown) or "<p class='muted'>No edits match.</p>"
    return page(
        title,
        f"<h1>{escape(title)}</h1>{form}{count}{pager(root, 'gallery', params, current, pages)}"
        f"<div class='grid'>{cards}</div>",
    )


def recent_page(root: str, shown: list[Edit], current: int, pages: int) -> str:
    """Render the newest edits of every DAG the user may read, with links to their runs' galleries."""
    cards = []
    for edit in shown:
        key = edit.key
        gallery = link(root, "gallery", dag_id=key.dag_id, run_id=key.run_id)
        cards.append(
            card(root, edit).removesuffix("</div></div>")
            + f"<br><a href='{gallery}'>{escape(key.dag_id)} / {escape(key.run_id)}</a></div></div>"
        )
    body = "".join(cards) or "<p class='muted'>No edits yet in the DAGs you may read.</p>"
    return page(
        "Recent image edits",
        f"<h1>Recent image edits</h1>{pager(root, 'recent', {}, current, pages)}"
        f"<div class='grid'>{body}</div>",
    )
