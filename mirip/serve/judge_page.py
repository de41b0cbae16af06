"""The judging page: plain HTML, CSS and JavaScript served as one document (no front-end build step).

Keys: <- left better, -> right better, down a tie, space skip, Z undo, N show or hide the file names (hidden:
judging blind). Each button does the same on a tablet. ``window.mirip`` exposes the page's state to tests.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mirip judging</title>
<style>
 * { box-sizing: border-box; }
 html, body { margin: 0; height: 100%; background: #1d1d1f; color: #eee; font: 16px system-ui, sans-serif; }
 body { display: flex; flex-direction: column; }
 header { display: flex; gap: 1.5em; padding: .4em 1em; align-items: baseline; flex-wrap: wrap; }
 header b { color: #fff; }
 #pair { flex: 1; display: flex; gap: 8px; padding: 0 8px; min-height: 0; }
 .side { flex: 1; display: flex; flex-direction: column; min-width: 0; cursor: pointer;
         border: 3px solid transparent; border-radius: 6px; }
 .side:hover { border-color: #4a90e2; }
 .side img { flex: 1; min-height: 0; width: 100%; object-fit: contain; background: #2a2a2c; }
 .name { height: 1.4em; text-align: center; font-size: 14px; color: #aaa; overflow: hidden; visibility: hidden; }
 body.names .name { visibility: visible; }
 nav { display: flex; gap: 8px; padding: 8px; }
 nav button { flex: 1; font-size: 18px; padding: .7em .3em; border-radius: 6px; border: 0;
              background: #3a3a3c; color: #fff; cursor: pointer; }
 nav button:active { background: #4a90e2; }
 #message { padding: 0 1em; color: #f5a623; min-height: 1.2em; }
</style></head>
<body>
<header><span>Judge: <b id="judge">__JUDGE__</b></span>
 <span>judged this session: <b id="session">0</b></span><span>pairs left: <b id="left">-</b></span>
 <span style="color:#999">which drawing is better?</span></header>
<div id="message"></div>
<main id="pair">
 <div class="side" id="sideA"><img id="imgA" alt="left drawing"><div class="name" id="nameA"></div></div>
 <div class="side" id="sideB"><img id="imgB" alt="right drawing"><div class="name" id="nameB"></div></div>
</main>
<nav>
 <button id="btnA">&larr; left better</button><button id="btnTie">&darr; tie</button>
 <button id="btnSkip">skip (space)</button><button id="btnUndo">undo (Z)</button>
 <button id="btnB">right better &rarr;</button><button id="btnNames">names (N)</button>
</nav>
<script>
"use strict";
const state = window.mirip = { offer: null, pending: true, done: 0, error: null, session: 0 };
// "judged this session" counts since this page opened: the offers it answered, less those it undid.
const mine = new Set();
const $ = (id) => document.getElementById(id);
function show(d) {
  state.session = mine.size;
  $("session").textContent = mine.size;
  $("left").textContent = d.left;
  const p = d.pair;
  state.offer = p ? p.offer : null;
  if (!p) { $("message").textContent = "No pairs left for you: thank you!";
            $("imgA").removeAttribute("src"); $("imgB").removeAttribute("src"); return; }
  $("message").textContent = "";
  $("imgA").src = "/judge/image/" + p.a.id + "?o=" + p.offer;
  $("imgB").src = "/judge/image/" + p.b.id + "?o=" + p.offer;
  $("nameA").textContent = p.a.name;  // textContent: a file name is never read as HTML
  $("nameB").textContent = p.b.name;
}
async function call(url, body, saved) {
  if (state.pending) return;
  state.pending = true;
  try {
    const r = await fetch(url, { method: body ? "POST" : "GET", credentials: "same-origin",
      headers: body ? { "Content-Type": "application/json" } : {}, body: body ? JSON.stringify(body) : undefined });
    const d = await r.json();
    if (!r.ok) { state.error = d.error; $("message").textContent = d.error || ("error " + r.status); }
    else { if (saved) saved(d); show(d); state.done += 1; }
  } catch (e) { state.error = String(e); $("message").textContent = "not saved, the server did not answer: " + e; }
  finally { state.pending = false; }
}
function choose(choice) {
  const offer = state.offer;
  if (offer) call("/judge/answer", { offer: offer, choice: choice }, () => { if (choice !== "skip") mine.add(offer); });
}
function undo() { call("/judge/undo", {}, (d) => { if (d.undone) mine.delete(d.undone.offer); }); }
$("sideA").onclick = $("btnA").onclick = () => choose("a");
$("sideB").onclick = $("btnB").onclick = () => choose("b");
$("btnTie").onclick = () => choose("tie");
$("btnSkip").onclick = () => choose("skip");
$("btnUndo").onclick = undo;
$("btnNames").onclick = () => document.body.classList.toggle("names");
document.addEventListener("keydown", (e) => {
  const act = { ArrowLeft: () => choose("a"), ArrowRight: () => choose("b"), ArrowDown: () => choose("tie"),
                " ": () => choose("skip"), z: undo, Z: undo,
                n: () => document.body.classList.toggle("names"), N: () => document.body.classList.toggle("names") }[e.key];
  if (act && !e.repeat) { e.preventDefault(); act(); }
});
state.pending = false;
call("/judge/next");
</script></body></html>
"""
