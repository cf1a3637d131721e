// trioclone console: the map under a prefix, kept live from /api/events.
"use strict";

const $ = (id) => document.getElementById(id);
const view = {
  prefix: "", filter: "", rows: new Map(), baseSeq: -1, generation: 0, truncated: false,
  keys: -1, // the map's size when listed: when it changes, keys came or went
  loading: 0, // listings on their way
  held: [], // batches that came meanwhile, applied on top of the listing
  readOnly: true, state: null, servers: [], lost: false,
};
let reloadTimer = null;
let applied = 0;

// -- keys as text ------------------------------------------------------------
// A key that is not UTF-8 comes as text with a lone surrogate U+DC80..U+DCFF
// for each byte that is not (Python's surrogateescape); in a URL it is that
// byte again (%FF), where encodeURIComponent would throw and URLSearchParams
// would send U+FFFD, another key.

function escapeText(text) {
  let out = "";
  for (const char of text) { // by code point: a lone surrogate stays alone
    const code = char.codePointAt(0);
    if (code >= 0xdc80 && code <= 0xdcff) out += "%" + (code - 0xdc00).toString(16).toUpperCase();
    else if (code >= 0xd800 && code <= 0xdfff) out += "%EF%BF%BD"; // no key's bytes make it
    else out += encodeURIComponent(char);
  }
  return out;
}

function unescapeText(text) {
  const bytes = [];
  for (let i = 0; i < text.length;) {
    const hex = text.slice(i + 1, i + 3);
    if (text[i] === "%" && /^[0-9a-fA-F]{2}$/.test(hex)) { bytes.push(parseInt(hex, 16)); i += 3; continue; }
    const char = String.fromCodePoint(text.codePointAt(i));
    bytes.push(...new TextEncoder().encode(char));
    i += char.length;
  }
  const strict = new TextDecoder("utf-8", { fatal: true });
  let out = "";
  for (let i = 0; i < bytes.length;) {
    const b = bytes[i];
    const size = b < 0x80 ? 1 : b >= 0xc2 && b <= 0xdf ? 2 : b >= 0xe0 && b <= 0xef ? 3
      : b >= 0xf0 && b <= 0xf4 ? 4 : 0;
    if (size) {
      try { out += strict.decode(new Uint8Array(bytes.slice(i, i + size))); i += size; continue; }
      catch (error) { /* not UTF-8: this byte as its surrogate */ }
    }
    out += String.fromCharCode(0xdc00 + b);
    i++;
  }
  return out;
}

function query(params) {
  return Object.entries(params).map(([k, v]) => `${k}=${escapeText(v)}`).join("&");
}

// Keys in the order the console sorts them: by code point, as Python does
// (JavaScript's < compares UTF-16 units, which puts U+10000 and above
// before U+E000..U+FFFF).
function keyBefore(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    if (a.charCodeAt(i) === b.charCodeAt(i)) continue;
    const x = a.codePointAt(i), y = b.codePointAt(i);
    return x < y;
  }
  return a.length < b.length;
}

// -- the listing -------------------------------------------------------------

function folderOf(key, prefix) {
  const slash = key.indexOf("/", prefix.length + 1);
  return slash < 0 || slash === key.length - 1 ? null : key.slice(0, slash + 1);
}

function inView(key) {
  if (!key.startsWith(view.prefix)) return false;
  // (the console lists with Python's str.lower(), the same Unicode mapping)
  if (view.filter) return key.toLowerCase().includes(view.filter.toLowerCase());
  // (a key equal to the prefix is a leaf one level up, as the listing has it)
  return key !== view.prefix && folderOf(key, view.prefix) === null;
}

async function load() {
  const generation = ++view.generation;
  const params = { prefix: view.prefix, filter: view.filter, limit: "500" };
  let data;
  view.loading++;
  try {
    const response = await fetch("/api/tree?" + query(params));
    data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
  } catch (error) {
    $("more").textContent = "could not load the keys: " + error.message;
    if (generation === view.generation) { view.held = []; scheduleLoad(2000); }
    return;
  } finally {
    view.loading--;
  }
  if (generation !== view.generation) return; // a newer load is on its way
  view.baseSeq = data.state.sequence;
  view.keys = data.state.keys;
  renderCrumbs();
  renderFolders(data.folders);
  const body = document.querySelector("#keys tbody");
  body.replaceChildren();
  view.rows.clear();
  for (const row of data.rows) body.appendChild(makeRow(row));
  const shown = data.rows.length;
  view.truncated = data.leaves > shown;
  const notes = [];
  if (data.subfolders > data.folders.length) {
    notes.push(`showing ${data.folders.length} of ${data.subfolders} folders`);
  }
  if (view.truncated) notes.push(`showing ${shown} of ${data.leaves} keys`);
  $("more").textContent = notes.length ? notes.join("; ") + ": narrow the prefix or the filter" : "";
  showState(data.state);
  markSeq(data.state.sequence);
  // Batches that came while the listing was on its way: those taken after
  // it (a higher sequence) hold changes it does not.
  const held = view.held;
  view.held = [];
  for (const batch of held) onBatch(batch);
}

let reloadDue = Infinity;

function scheduleLoad(delay) {
  // one reload at a time, at the soonest time asked for
  const due = performance.now() + delay;
  if (reloadTimer !== null) {
    if (due >= reloadDue) return;
    clearTimeout(reloadTimer);
  }
  reloadDue = due;
  reloadTimer = setTimeout(() => { reloadTimer = null; reloadDue = Infinity; load(); }, delay);
}

function go(prefix) {
  view.prefix = prefix;
  history.replaceState(null, "", "#" + escapeText(prefix));
  scheduleNow();
}

function scheduleNow() {
  if (reloadTimer !== null) { clearTimeout(reloadTimer); reloadTimer = null; reloadDue = Infinity; }
  load();
}

function renderCrumbs() {
  const nav = $("crumbs");
  nav.replaceChildren(link("all keys", ""));
  let start = 1;
  for (;;) {
    const slash = view.prefix.indexOf("/", start);
    if (slash < 0) break;
    const part = view.prefix.slice(0, slash + 1);
    nav.append(" › ", link(part.slice(part.lastIndexOf("/", slash - 1) + 1), part));
    start = slash + 1;
  }
}

function link(text, prefix) {
  const a = document.createElement("a");
  a.textContent = text;
  a.addEventListener("click", () => go(prefix));
  return a;
}

function renderFolders(folders) {
  const list = $("folders");
  list.replaceChildren();
  for (const [folder, count] of folders) {
    const item = document.createElement("li");
    const a = link(folder.slice(view.prefix.length), folder);
    a.dataset.folder = folder;
    const badge = document.createElement("span");
    badge.className = "count";
    badge.textContent = count;
    a.append(badge);
    item.append(a);
    list.append(item);
  }
}

// -- rows ----------------------------------------------------------------------

function hexOf(b64) {
  return Array.from(atob(b64), (c) => c.charCodeAt(0).toString(16).padStart(2, "0")).join("");
}

function fillRow(tr, row) {
  const [keyCell, valueCell, seqCell, ttlCell] = tr.cells;
  keyCell.textContent = row.k;
  keyCell.title = row.k;
  valueCell.replaceChildren();
  if (row.e === "text") {
    valueCell.textContent = row.v;
  } else {
    const tag = document.createElement("span");
    tag.className = "enc";
    const hex = row.n <= 32;
    tag.textContent = hex ? "hex" : "b64";
    valueCell.append(tag, hex ? hexOf(row.v) : row.v);
  }
  if (row.cut) valueCell.append(` … (${row.n} bytes)`);
  valueCell.title = row.e === "text" ? row.v : `${row.n} bytes`;
  seqCell.textContent = row.s;
  tr.dataset.seq = row.s;
  if (row.t === undefined) {
    delete ttlCell.dataset.deadline;
    ttlCell.textContent = "";
  } else {
    ttlCell.dataset.deadline = performance.now() / 1000 + row.t;
    showTtl(ttlCell);
  }
}

function makeRow(row) {
  const tr = document.createElement("tr");
  tr.dataset.key = row.k;
  for (let i = 0; i < 4; i++) tr.insertCell();
  tr.cells[2].className = tr.cells[3].className = "num";
  const actions = tr.insertCell();
  if (!view.readOnly) {
    actions.append(button("edit", () => edit(tr.dataset.key)));
    actions.append(button("del", () => remove(tr.dataset.key)));
  }
  fillRow(tr, row);
  view.rows.set(row.k, tr);
  return tr;
}

function button(text, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.className = text;
  b.addEventListener("click", onClick);
  return b;
}

function flash(tr) {
  tr.classList.remove("flash");
  void tr.offsetWidth; // restart the animation
  tr.classList.add("flash");
}

function showTtl(cell) {
  const left = Number(cell.dataset.deadline) - performance.now() / 1000;
  cell.textContent = left > 0 ? `${Math.ceil(left)}s` : "0s";
}

setInterval(() => {
  for (const cell of document.querySelectorAll("td[data-deadline]")) showTtl(cell);
}, 500);

function applyRow(row) {
  const tr = view.rows.get(row.k);
  if (tr && Number(tr.dataset.seq) > row.s) return; // older than what is shown
  if (row.d) {
    if (tr) { tr.remove(); view.rows.delete(row.k); }
    if (tr && view.truncated) scheduleLoad(2000); // the next key moves up
    return;
  }
  if (tr) {
    fillRow(tr, row);
    flash(tr);
    return;
  }
  const body = document.querySelector("#keys tbody");
  // The rows shown are the first keys in order: a key not shown that sorts
  // before the last of them is new, and takes its place; one after it is
  // not shown.
  const lastShown = body.rows.length ? body.rows[body.rows.length - 1].dataset.key : "";
  if (view.truncated && keyBefore(lastShown, row.k)) return;
  const fresh = makeRow(row);
  let after = null;
  for (const other of body.rows) {
    if (keyBefore(row.k, other.dataset.key)) { after = other; break; }
  }
  body.insertBefore(fresh, after);
  flash(fresh);
  if (view.truncated) { // still the first keys only
    const dropped = body.rows[body.rows.length - 1];
    view.rows.delete(dropped.dataset.key);
    dropped.remove();
  }
}

// -- the event stream ------------------------------------------------------------

function onBatch(batch) {
  showState(batch.state);
  if (batch.reload) { scheduleLoad(0); return; }
  if (view.loading) { view.held.push(batch); return; }
  if (batch.state.sequence <= view.baseSeq && batch.rows.length) {
    markSeq(batch.state.sequence);
    return; // the listing already holds these values
  }
  // Folders' counts change only when keys come or go: a delete says so,
  // and a set of a new key changes the map's size, unless a delete in the
  // same batch made up for it; then a set of a key not shown may be new.
  let countsChanged = batch.state.keys !== view.keys;
  const deletes = batch.rows.some((row) => row.d);
  for (const row of batch.rows) {
    // a row shown is kept up to date even if this page would not list it
    if (view.rows.has(row.k) || inView(row.k)) applyRow(row);
    else if (row.k.startsWith(view.prefix) && (row.d || deletes)) countsChanged = true;
  }
  applied += batch.rows.length;
  document.body.dataset.applied = applied;
  if (countsChanged) scheduleLoad(2000);
  markSeq(batch.state.sequence);
}

function markSeq(sequence) {
  document.body.dataset.seq = sequence;
}

function onStatus(status) {
  view.servers = status.servers;
  showState(status.state);
  renderServers(status.servers);
  renderRates(status.rates.slice(-Math.max(2, Math.floor(status.running))));
}

function showState(state) {
  view.state = state;
  const pill = $("client");
  pill.className = "pill " + (state.synced ? "ok" : "bad");
  pill.textContent = state.synced
    ? `synced with ${state.server}` : `${state.phase}: trying ${state.server || "…"}`;
  $("counts").textContent = `${state.keys.toLocaleString()} keys · sequence ${state.sequence}`;
  renderBanner();
}

function renderBanner() {
  const banner = $("banner");
  const state = view.state;
  let text = "", kind = "bad";
  const inUse = view.servers.find((s) => s.in_use);
  if (view.lost) {
    text = "Lost the console: reconnecting…";
  } else if (state && !state.synced) {
    text = `Failing over: the console's client is ${state.phase}, trying ${state.server || "a server"}; the map shown may be stale.`;
  } else if (inUse && inUse.error) {
    text = `The server in use (${inUse.server}) does not answer: the client fails over to the other if it stays silent.`;
  } else if (state && state.news) {
    kind = "warn";
    text = `The console's client ${state.news.text} (${Math.round(state.news.ago)} s ago).`;
  }
  banner.hidden = !text;
  banner.className = "banner " + kind;
  banner.textContent = text;
}

function renderRates(rates) {
  // the seconds the console has run, up to the last 60, across the width
  const top = Math.max(1, ...rates);
  const step = 180 / Math.max(1, rates.length - 1);
  const points = rates.map((r, i) => `${(i * step).toFixed(1)},${(26 - (r / top) * 24).toFixed(1)}`);
  document.querySelector("#spark polyline").setAttribute("points", points.join(" "));
  $("rate").textContent = `${rates[rates.length - 1].toLocaleString()} updates/s`;
}

const FIELDS = [
  ["role", "role"], ["sequence", "sequence"], ["keys", "keys"], ["pending", "pending"],
  ["synced", "synced"], ["peer hb", "peer_heartbeat_age"], ["uptime", "uptime"], ["name", "name"],
];

function renderServers(servers) {
  const box = $("servers");
  box.replaceChildren();
  for (const s of servers) {
    const card = document.createElement("div");
    card.className = "server";
    card.dataset.server = s.server;
    const head = document.createElement("div");
    head.className = "head";
    const where = document.createElement("span");
    where.textContent = s.server + (s.in_use ? " (in use)" : "");
    const state = document.createElement("span");
    state.className = s.error ? "unreachable" : "state-" + s.state;
    state.textContent = s.error ? "unreachable" : s.state;
    head.append(where, state);
    card.append(head);
    if (s.error) {
      const why = document.createElement("div");
      why.className = "muted";
      why.textContent = s.error;
      card.append(why);
    } else {
      const list = document.createElement("dl");
      for (const [label, field] of FIELDS) {
        const dt = document.createElement("dt");
        dt.textContent = label;
        const dd = document.createElement("dd");
        dd.dataset.field = field;
        dd.textContent = show(field, s[field], s);
        list.append(dt, dd);
      }
      card.append(list);
    }
    box.append(card);
  }
  renderBanner();
}

function show(field, value, server) {
  if (value === undefined || value === null) {
    return field === "peer_heartbeat_age" && !server.pair ? "standalone" : "-";
  }
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (field === "peer_heartbeat_age") return `${value.toFixed(1)} s`;
  if (field === "uptime") return `${Math.round(value)} s`;
  return typeof value === "number" ? value.toLocaleString() : String(value);
}

function connect() {
  const events = new EventSource("/api/events");
  events.addEventListener("batch", (e) => onBatch(JSON.parse(e.data)));
  events.addEventListener("status", (e) => onStatus(JSON.parse(e.data)));
  events.addEventListener("open", () => {
    view.lost = false;
    renderBanner();
    scheduleNow(); // whatever changed while it was away
  });
  events.addEventListener("error", () => { view.lost = true; renderBanner(); });
}

// -- writes ------------------------------------------------------------------------

async function write(path, body) {
  const result = $("write-result");
  result.className = "";
  result.textContent = "writing…";
  try {
    const response = await fetch(path, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    result.className = "ok";
    result.textContent = `${path.endsWith("delete") ? "deleted" : "set"} ${data.key}: sequence ${data.sequence}`;
  } catch (error) {
    result.className = "bad";
    result.textContent = "error: " + error.message;
  }
}

async function edit(key) {
  const response = await fetch("/api/key?" + query({ key }));
  const row = await response.json();
  if (!response.ok) { $("write-result").textContent = "error: " + row.error; return; }
  $("set-key").value = row.k;
  $("set-value").value = row.v;
  $("set-encoding").value = row.e === "text" ? "text" : "base64";
  $("set-ttl").value = "";
  $("set-value").focus();
}

function remove(key) {
  if (window.confirm(`Delete ${key}?`)) write("/api/delete", { key });
}

function setUp(config) {
  view.readOnly = config.read_only;
  $("set-form").hidden = config.read_only;
  $("read-only").hidden = !config.read_only;
  document.title = `trioclone console: ${config.servers.join(", ")}`;
  $("set-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const ttl = $("set-ttl").value;
    write("/api/set", {
      key: $("set-key").value, value: $("set-value").value,
      encoding: $("set-encoding").value, ttl: ttl === "" ? null : Number(ttl),
    });
  });
  $("delete-button").addEventListener("click", () => {
    const key = $("set-key").value;
    if (key) remove(key);
  });
  let typing = null;
  $("filter").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { view.filter = $("filter").value; scheduleNow(); }, 150);
  });
}

async function main() {
  const config = await (await fetch("/api/config")).json();
  setUp(config);
  view.prefix = unescapeText(location.hash.slice(1));
  renderCrumbs();
  connect();
}

main();
