// mabrec live demo: plain JavaScript, no library, nothing from anywhere but this API.
// Every text from the API goes into the page as text (textContent, text nodes), never as HTML.
"use strict";

const TOKEN_KEY = "mabrec-demo-token"; // sessionStorage: this tab only, gone when it closes
const UXID_KEY = "mabrec-demo-uxid";
const SVG_NS = "http://www.w3.org/2000/svg"; // the SVG namespace name (never fetched)
const SLATE_SIZE = 10;
const POLL_MS = 200;
const APPLY_TIMEOUT_MS = 15000;
const TOP_GENRES = 8;

const el = (id) => document.getElementById(id);

const state = {
  uxid: "",
  recommendationId: null, // of the slate on screen: quoted on a click, for attribution
  generation: 0, // bumped when the user changes: stale answers are dropped
  busy: false,
};

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// Elements are built from parts; strings become text nodes.
function make(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  node.append(...children);
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function setStatus(text, kind = "") {
  const status = el("status");
  status.textContent = text;
  status.className = "status" + (kind ? " " + kind : "");
}

// --- the admin token: from the fragment (#token=...) or the field, kept in sessionStorage ----

function takeTokenFromFragment() {
  const parts = location.hash.replace(/^#/, "").split("&").filter(Boolean);
  const rest = [];
  let token = null;
  for (const part of parts) {
    if (part.startsWith("token=")) token = decodeURIComponent(part.slice("token=".length));
    else rest.push(part);
  }
  if (token === null) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  // Off the address bar (and out of the history) once kept.
  history.replaceState(null, "", location.pathname + location.search + (rest.length ? "#" + rest.join("&") : ""));
}

const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

function showTokenState() {
  el("token-state").textContent = token()
    ? "Token set for this tab."
    : "No token: the profile needs the admin token (open /demo#token=… or enter it here).";
}

// --- the API -----------------------------------------------------------------------------

// A header value is bytes, and fetch takes them as a string of code points up to 255: the
// uxid's UTF-8 bytes, one per code point (the API reads a uxid header as UTF-8).
function headerBytes(text) {
  return Array.from(new TextEncoder().encode(text), (byte) => String.fromCharCode(byte)).join("");
}

async function api(path, headers = {}) {
  let response;
  try {
    response = await fetch(path, { headers: { uxid: headerBytes(state.uxid), ...headers }, cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, "the API did not answer (" + error.message + ")");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = body.detail || body.error || detail;
    } catch (_) {
      // not JSON: keep the status text
    }
    throw new ApiError(response.status, String(detail));
  }
  return response;
}

async function loadSlate() {
  const generation = state.generation;
  const response = await api("/api/recommendations/movies?limit=" + SLATE_SIZE);
  const movies = await response.json();
  if (generation !== state.generation) return;
  state.recommendationId = response.headers.get("X-Recommendation-Id");
  renderSlate(movies, response.headers.get("X-Mabrec-Source") || "personal");
}

// The profile, rendered; null when it cannot be read (no token, a refused one, an error).
async function loadProfile() {
  const generation = state.generation;
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  try {
    const profile = await (await api("/api/profile", headers)).json();
    if (generation !== state.generation) return null;
    renderProfile(profile);
    return profile;
  } catch (error) {
    if (generation !== state.generation) return null;
    renderProfileError(error);
    return null;
  }
}

// --- rendering -------------------------------------------------------------------------

function reasonKind(reason) {
  if (reason.startsWith("you like")) return "liked";
  if (reason === "popular") return "popular";
  if (reason === "something new") return "new";
  return "other";
}

function facts(movie) {
  const genres = (movie.genres || []).map((g) => g.name).join(", ");
  return [
    movie.rating != null ? "★ " + Number(movie.rating).toFixed(1) : null,
    movie.duration ? movie.duration + " " + (movie.duration_unit || "") : null,
    genres || null,
  ]
    .filter(Boolean)
    .join(" · ");
}

function renderSlate(movies, source) {
  const items = movies.map((movie, i) => {
    const reason = String(movie.reason || "");
    const open = make("button", { type: "button", class: "open", "data-movie-id": movie.id }, "Open");
    open.setAttribute("aria-label", "Open " + movie.name);
    open.disabled = state.busy;
    open.addEventListener("click", () => openMovie(movie));
    return make(
      "li",
      { class: "movie", "data-movie-id": movie.id },
      make("span", { class: "rank", "aria-hidden": "true" }, String(i + 1)),
      make("div", {}, make("h3", { class: "title" }, movie.name), make("p", { class: "facts" }, facts(movie))),
      make("span", { class: "reason " + reasonKind(reason), title: "why it is here" }, reason),
      open,
    );
  });
  el("slate").replaceChildren(...items);
  const fallback = source === "popularity-fallback" ? " (the user's shard is restarting: popularity)" : "";
  el("slate-meta").textContent =
    movies.length + " movies for " + state.uxid + " · recommendation " + state.recommendationId + " · " + source + fallback;
}

function renderProfile(profile) {
  el("profile-message").hidden = true;
  el("clicks").textContent = String(profile.clicks);
  el("impressions").textContent = String(profile.impressions);
  renderChart(profile.top_facets || [], profile.facets || []);
}

function renderProfileError(error) {
  let text;
  if (error.status === 401) {
    text = token()
      ? "The admin token was refused (401): enter the token the system runs with (MABREC_ADMIN_TOKEN)."
      : "The profile needs the admin token (401): open this page as /demo#token=… or enter it above.";
  } else if (error.status === 403) {
    text = "The profile is off (403): the system runs without an admin token (set MABREC_ADMIN_TOKEN).";
  } else {
    text = "The profile could not be read (" + (error.status || "network") + "): " + error.message;
  }
  const message = el("profile-message");
  message.textContent = text;
  message.hidden = false;
  el("clicks").textContent = "–";
  el("impressions").textContent = "–";
  el("genre-chart").replaceChildren();
  el("genre-chart").setAttribute("viewBox", "0 0 400 10");
  el("chart-values").textContent = "";
  el("chart-note").textContent = "";
}

// Horizontal bars: the clicked genres, by the lift the policy gives their movies (the profile's
// top_facets, in its order): the bar is the posterior mean, the tick one standard deviation lower.
function renderChart(topFacets, facets) {
  const genres = topFacets
    .filter((f) => f.kind === "genres")
    .slice(0, TOP_GENRES)
    .map((f) => ({ name: f.name ?? "#" + f.id, lift: f.lift, cautious: f.cautious_lift, clicks: f.clicks, seen: f.impressions }));
  const chart = el("genre-chart");
  const [left, width, row, top, full] = [92, 140, 24, 18, 400];
  const scale = Math.max(1, ...genres.map((g) => g.lift));
  const x = (lift) => left + (Math.max(0, lift) / scale) * width;
  const height = top + Math.max(genres.length, 1) * row + 4;
  chart.setAttribute("viewBox", "0 0 " + full + " " + height);
  const parts = [];
  const axis = svg("g", { class: "axis", "aria-hidden": "true" });
  for (const tick of [0, scale / 2, scale]) {
    axis.append(svg("line", { x1: x(tick), x2: x(tick), y1: top - 4, y2: height }));
    axis.append(svg("text", { x: x(tick), y: top - 7, "text-anchor": "middle" }, "+" + tick.toFixed(1)));
  }
  parts.push(axis);
  if (genres.length === 0) {
    parts.push(svg("text", { class: "empty", x: left + 8, y: top + 17 }, "No genre clicked yet: open a movie."));
  }
  genres.forEach((g, i) => {
    const y = top + i * row;
    const bar = svg("g", { class: "bar", "data-genre": g.name });
    bar.append(
      svg("title", {}, g.name + ": lift " + signed(g.lift) + " (cautious " + signed(g.cautious) + "), " + plural(g.clicks, "click") + ", " + g.seen + " seen"),
    );
    bar.append(svg("text", { x: left - 8, y: y + 16, "text-anchor": "end" }, g.name));
    bar.append(svg("rect", { x: left, y: y + 4, width: Math.max(1, x(g.lift) - left), height: 16, rx: 3 }));
    bar.append(svg("line", { class: "cautious", x1: x(g.cautious), x2: x(g.cautious), y1: y + 2, y2: y + 22 }));
    bar.append(svg("text", { class: "value", x: left + width + 8, y: y + 16 }, signed(g.lift) + " · " + plural(g.clicks, "click") + ", " + g.seen + " seen"));
    parts.push(bar);
  });
  chart.replaceChildren(...parts);
  el("chart-values").textContent = genres.length
    ? genres.map((g) => g.name + " lift " + signed(g.lift) + " from " + plural(g.clicks, "click")).join(", ") + "."
    : "No genre clicked yet.";
  const seenOnly = facets.filter((f) => f.kind === "genres" && f.clicks === 0).length;
  el("chart-note").textContent =
    "Lift: how much more likely mabrec makes a genre's movies for this user (log-odds, +0.7 is about twice), " +
    "from their clicks against what the movies' quality and share of their slates predict; ranked by the " +
    "cautious lift (the tick), what the evidence supports even if some clicks were luck. " +
    seenOnly + " more genre" + (seenOnly === 1 ? " was" : "s were") + " only seen in slates so far.";
}

function plural(n, word) {
  return n + " " + word + (n === 1 ? "" : "s");
}

function signed(value) {
  return (value >= 0 ? "+" : "−") + Math.abs(value).toFixed(2);
}

function renderOpened(movie) {
  el("opened-title").textContent = movie.name;
  el("opened-facts").textContent = facts(movie);
  el("opened-description").textContent = movie.description || "";
  el("opened-panel").hidden = false;
  for (const item of el("slate").children) item.classList.toggle("opened", item.dataset.movieId === String(movie.id));
}

function setBusy(busy) {
  state.busy = busy;
  el("slate").setAttribute("aria-busy", String(busy));
  for (const button of el("slate").querySelectorAll("button.open")) button.disabled = busy;
}

// --- what the user does ------------------------------------------------------------------

async function chooseUser(uxid) {
  uxid = uxid.trim();
  const characters = Array.from(uxid).length; // code points, as the API counts them
  if (characters < 1 || characters > 128 || /[\p{C}\p{Zl}\p{Zp}]/u.test(uxid)) {
    setStatus("A uxid is 1 to 128 printable characters.", "error");
    el("uxid").focus();
    return;
  }
  state.uxid = uxid;
  state.generation += 1;
  state.recommendationId = null;
  el("uxid").value = uxid;
  sessionStorage.setItem(UXID_KEY, uxid);
  el("opened-panel").hidden = true;
  setStatus("Loading the slate of " + uxid + "…", "wait");
  try {
    await loadSlate();
    await loadProfile();
    setStatus("Slate of " + uxid + ". Open a movie to click it.", "ok");
  } catch (error) {
    setStatus("Could not load the slate: " + error.message, "error");
  }
}

// A click: GET /api/movies/{id} with the uxid and the slate's id. It is applied asynchronously
// (NATS, then the user's shard), so the page watches the profile until its clicks grow.
async function openMovie(movie) {
  if (state.busy) return;
  const generation = state.generation;
  setBusy(true);
  try {
    const before = await loadProfile();
    const headers = state.recommendationId ? { "X-Recommendation-Id": state.recommendationId } : {};
    renderOpened(await (await api("/api/movies/" + encodeURIComponent(movie.id), headers)).json());
    if (before === null) {
      await loadSlate();
      setStatus("Click sent. Without the profile (see above) the page cannot tell when it is applied.", "wait");
      return;
    }
    const started = performance.now();
    for (;;) {
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      setStatus("Click on " + movie.name + " sent through NATS; waiting for the shard to apply it… " + seconds + " s", "wait");
      await sleep(POLL_MS);
      if (generation !== state.generation) return;
      const now = await loadProfile();
      if (now !== null && now.clicks > before.clicks) break;
      if (performance.now() - started > APPLY_TIMEOUT_MS) {
        setStatus("The click was not applied within " + APPLY_TIMEOUT_MS / 1000 + " s: is the system healthy (/readyz)?", "error");
        return;
      }
    }
    const took = ((performance.now() - started) / 1000).toFixed(2);
    await loadSlate();
    setStatus("Click on " + movie.name + " applied in " + took + " s: the profile and the new slate reflect it.", "ok");
  } catch (error) {
    if (generation === state.generation) setStatus("The click failed: " + error.message, "error");
  } finally {
    setBusy(false);
  }
}

function randomUser() {
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  return "demo-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function start() {
  takeTokenFromFragment();
  showTokenState();
  el("user-form").addEventListener("submit", (event) => {
    event.preventDefault();
    chooseUser(el("uxid").value);
  });
  el("random-user").addEventListener("click", () => chooseUser(randomUser()));
  for (const chip of document.querySelectorAll("button[data-uxid]")) {
    chip.addEventListener("click", () => chooseUser(chip.dataset.uxid));
  }
  el("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = el("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    el("token").value = "";
    showTokenState();
    if (state.uxid) loadProfile();
  });
  el("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    if (state.uxid) loadProfile();
  });
  const previous = sessionStorage.getItem(UXID_KEY);
  if (previous) chooseUser(previous);
}

start();
