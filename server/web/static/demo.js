// Giftstream live room: a browser client of docs/protocol.md (served at /docs).
// Joins over the giftstream.json subprotocol, resumes from its last offset after a drop,
// honours the close reason's advice ({"reason","reconnect","retry_ms"}), and retries gifts
// and recharges with the same idempotency key. Every text from the server goes into the page
// with textContent, never as HTML: names and titles are user input.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const ART = {
    rose: "🌹", tiktok: "🎵", finger_heart: "🫰", panda: "🐼", perfume: "🧴", doughnut: "🍩",
    hat_and_mustache: "🎩", confetti: "🎉", galaxy: "🌌", drama_queen: "👑", interstellar: "🚀",
    lion: "🦁", tiktok_universe: "🪐",
  };
  const FEED_MAX = 200;
  const BURSTS_MAX = 4;
  const NONCE = Math.random().toString(36).slice(2, 10);

  const s = {
    token: "", claims: {}, room: "",
    catalog: { gifts: [], packages: [] }, giftsById: new Map(),
    ws: null, joined: false, ended: false, epoch: null, offset: null, attempts: 0, retryTimer: 0, stopped: true,
    pending: new Map(), // gift message id -> {msg, tries}: sent again, same id, until answered
    shown: new Set(), // gift_ids already in the feed: each event once, whatever the socket says
    you: null, host: null, coins: null, coinsTotal: 0, giftsTotal: 0,
    sent: new Map(), // gift_id -> the gift message this page sent, to name it in the history
    count: 1, seq: 0, history: [], serverHistory: null, roomSync: 0, historySync: 0,
  };

  // -- small helpers ---------------------------------------------------------------------

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function art(giftId) { return ART[giftId] || "🎁"; }
  function giftName(giftId) { const g = s.giftsById.get(giftId); return g ? g.name : giftId; }
  function fmt(n) { return Number(n || 0).toLocaleString("en-US"); }
  function initials(name) {
    const parts = String(name || "?").trim().split(/\s+/).filter(Boolean);
    return ((parts[0] || "?")[0] + (parts.length > 1 ? parts[parts.length - 1][0] : "")).toUpperCase();
  }
  function hue(id) {
    let h = 0;
    for (const c of String(id)) h = (h * 31 + c.codePointAt(0)) % 360;
    return h;
  }
  function avatar(user, cls) {
    const a = el("span", "avatar" + (cls ? " " + cls : ""), initials(user && user.name));
    a.style.setProperty("--hue", String(hue(user && user.id)));
    return a;
  }
  function money(cents, currency) {
    try {
      return new Intl.NumberFormat("en-US", { style: "currency", currency: currency || "USD" }).format(cents / 100);
    } catch { return (cents / 100).toFixed(2) + " " + (currency || ""); }
  }
  function time(ms) {
    return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function claimsOf(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(part + "===".slice((part.length + 3) % 4)), (c) => c.charCodeAt(0));
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      return claims && typeof claims === "object" ? claims : {};
    } catch { return {}; }
  }

  // Offsets are "<ms>-<seq>": compared as a pair of integers, never as strings.
  function parseOffset(o) {
    const [ms, seq] = String(o).split("-");
    return [BigInt(ms || 0), BigInt(seq || 0)];
  }
  function newer(a, b) {
    if (b === null || b === undefined) return true;
    const [a1, a2] = parseOffset(a);
    const [b1, b2] = parseOffset(b);
    return a1 > b1 || (a1 === b1 && a2 > b2);
  }

  function toast(text, kind) {
    const t = el("div", "toast" + (kind ? " " + kind : ""), text);
    $("toasts").append(t);
    setTimeout(() => t.remove(), 4500);
  }

  // -- HTTP -------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, body) {
      super(message); this.status = status; this.code = code; this.body = body || {};
    }
  }

  async function api(method, path, body) {
    const headers = { accept: "application/json" };
    if (s.token) headers.authorization = "Bearer " + s.token;
    if (body !== undefined) headers["content-type"] = "application/json";
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    let data = null;
    try { data = await r.json(); } catch { data = null; }
    if (!r.ok) {
      throw new ApiError(r.status, data && data.code, (data && data.message) || "HTTP " + r.status, data);
    }
    return data;
  }

  // A request that is safe to repeat as it was (same idempotency key): a few tries on a network
  // error or a 503, with a growing, jittered pause.
  async function retrying(fn) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await fn();
      } catch (err) {
        const again = !(err instanceof ApiError) || err.status === 503;
        if (!again || attempt >= 4) throw err;
        await new Promise((ok) => setTimeout(ok, (300 << attempt) * (0.5 + Math.random() / 2)));
      }
    }
  }

  // -- status, balance, viewers -----------------------------------------------------------

  function setStatus(state, text) {
    const e = $("status");
    e.dataset.state = state;
    e.textContent = text || state;
  }

  function setBalance(coins) {
    if (typeof coins !== "number") return;
    s.coins = coins;
    $("balance").textContent = String(coins);
    $("wallet-coins").textContent = fmt(coins);
    for (const b of $("gifts").children) b.classList.toggle("dear", Number(b.dataset.coins) > coins);
  }

  function setViewers(n) { if (typeof n === "number") $("viewers").textContent = fmt(n); }

  function setTotals(coins, gifts) {
    if (typeof coins === "number") s.coinsTotal = coins;
    if (typeof gifts === "number") s.giftsTotal = gifts;
    $("coins-total").textContent = fmt(s.coinsTotal);
    $("gifts-total").textContent = fmt(s.giftsTotal);
  }

  function banner(text) {
    const b = $("banner");
    b.hidden = !text;
    b.textContent = text || "";
  }

  // -- catalog, wallet, history -----------------------------------------------------------

  async function loadCatalog() {
    const c = await retrying(() => api("GET", "/v1/catalog"));
    s.catalog = c;
    s.giftsById = new Map(c.gifts.map((g) => [g.id, g]));
    const tray = $("gifts");
    tray.replaceChildren();
    for (const g of c.gifts) {
      const b = el("button", "gift");
      b.type = "button";
      b.dataset.testid = "gift-" + g.id;
      b.dataset.coins = String(g.coins);
      b.title = `${g.name}: ${fmt(g.coins)} coins`;
      const price = el("span", "price");
      price.append(el("span", "coin"), document.createTextNode(fmt(g.coins)));
      b.append(el("span", "art", art(g.id)), el("span", "name", g.name), price);
      b.addEventListener("click", () => sendGift(g.id, b));
      tray.append(b);
    }
    const packs = $("packages");
    packs.replaceChildren();
    for (const p of c.packages) {
      const b = el("button", "package");
      b.type = "button";
      b.dataset.testid = "recharge-" + p.id;
      const coins = el("span", "pack-coins");
      coins.append(el("span", "coin"), document.createTextNode(fmt(p.coins)));
      b.append(coins, el("span", "pack-price", money(p.price_cents, p.currency)));
      b.addEventListener("click", () => recharge(p, b));
      packs.append(b);
    }
    if (s.coins !== null) setBalance(s.coins);
  }

  async function refreshWallet() {
    const w = await retrying(() => api("GET", "/v1/wallet"));
    setBalance(w.coins);
    $("wallet-month").textContent = w.monthly_budget === null || w.monthly_budget === undefined
      ? `· ${fmt(w.month_spent)} spent this month`
      : `· ${fmt(w.month_spent)} of ${fmt(w.monthly_budget)} this month`;
    await refreshHistory();
  }

  // The server's transaction history when it has one (GET /v1/wallet/transactions), otherwise
  // what this page did: its recharges and the gifts it sent.
  async function refreshHistory() {
    if (s.serverHistory === false) return renderHistory();
    try {
      const data = await api("GET", "/v1/wallet/transactions?limit=30");
      const items = Array.isArray(data) ? data : data && (data.transactions || data.items || data.entries);
      s.serverHistory = Array.isArray(items) ? items : false;
    } catch (err) {
      if (err instanceof ApiError && (err.status === 404 || err.status === 405)) s.serverHistory = false;
    }
    renderHistory();
  }

  // One read of the wallet and its history after a burst of gifts, not one per gift.
  function refreshHistorySoon() {
    clearTimeout(s.historySync);
    s.historySync = setTimeout(() => refreshWallet().catch(() => undefined), 600);
  }

  function renderHistory() {
    const list = $("history");
    list.replaceChildren();
    const items = Array.isArray(s.serverHistory) ? s.serverHistory.map(fromServer) : s.history;
    for (const h of items.slice(0, 30)) {
      const li = el("li", "tx " + (h.coins >= 0 ? "in" : "out"));
      li.append(el("span", "tx-what", h.what), el("span", "tx-when", h.ts ? time(h.ts) : ""),
        el("span", "tx-coins", (h.coins >= 0 ? "+" : "−") + fmt(Math.abs(h.coins))));
      list.append(li);
    }
    if (!items.length) list.append(el("li", "empty", "Nothing yet."));
  }

  // A line of GET /v1/wallet/transactions: {kind, coins (signed), at, gift_id | order_id | ref}.
  function fromServer(t) {
    const coins = Number(t.coins ?? 0);
    const kind = String(t.kind ?? "movement").replace(/_/g, " ");
    const sent = t.gift_id ? s.sent.get(t.gift_id) : null;
    const what = sent ? `${giftName(sent.gift)}${sent.count > 1 ? " ×" + sent.count : ""}`
      : kind.charAt(0).toUpperCase() + kind.slice(1) + (t.settled === false ? " (settling)" : "");
    return { what, coins, ts: Number(t.at ?? t.created_at ?? 0) || null };
  }

  function remember(entry) {
    s.history.unshift(entry);
    s.history.length = Math.min(s.history.length, 100);
    renderHistory();
    refreshHistorySoon();
  }

  async function recharge(pack, button) {
    button.disabled = true;
    const key = `web-${NONCE}-r${++s.seq}`;
    try {
      const order = await retrying(() => api("POST", "/v1/recharges",
        { package_id: pack.id, payment_method: "sandbox_card", idempotency_key: key }));
      if (typeof order.balance === "number") setBalance(order.balance);
      remember({ what: `Recharge ${money(order.price_cents, order.currency)}`, coins: order.coins, ts: order.created_at });
      toast(`+${fmt(order.coins)} coins`, "good");
      if (order.status !== "credited") toast("Payment pending: coins arrive when it clears");
    } catch (err) {
      toast(err.message, "bad");
    } finally {
      button.disabled = false;
    }
  }

  // -- the room ---------------------------------------------------------------------------

  async function refreshRoom() {
    try {
      const r = await api("GET", "/v1/rooms/" + encodeURIComponent(s.room));
      $("room-title").textContent = r.title;
      setHost(r.host);
      setTotals(r.coins_total, r.gifts_total);
      renderLeaderboard(r.top_gifters);
      setViewers(r.viewers);
      if (!r.live) ended("This LIVE has ended.");
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) ended("No such room.");
    }
  }

  // The totals move with each gift event; the room's own figures are read again shortly after
  // a burst, so the page agrees with the server whatever it missed.
  function syncRoomSoon() {
    clearTimeout(s.roomSync);
    s.roomSync = setTimeout(refreshRoom, 1500);
  }

  function setHost(host) {
    if (!host) return;
    s.host = host;
    $("host-name").textContent = host.name;
    for (const id of ["host-avatar", "host-avatar-big"]) {
      const a = $(id);
      a.textContent = initials(host.name);
      a.style.setProperty("--hue", String(hue(host.id)));
    }
    arrange();
  }

  function isHost() { return !!(s.host && s.you && s.host.id === s.you.id); }

  function arrange() {
    const mine = isHost();
    $("tray").hidden = mine || s.ended;
    $("host-tools").hidden = !mine;
    document.body.classList.toggle("hosting", mine);
    $("share").value = `${location.origin}/demo?room=${encodeURIComponent(s.room)}`;
  }

  function renderLeaderboard(top) {
    if (!Array.isArray(top)) return;
    const list = $("leaderboard");
    list.replaceChildren();
    top.slice(0, 10).forEach((u, i) => {
      const li = el("li", "leader" + (s.you && u.id === s.you.id ? " leader-me" : ""));
      li.dataset.userId = u.id;
      li.append(el("span", "rank rank-" + (i + 1), String(i + 1)), avatar(u, "small"), el("span", "leader-name", u.name),
        el("span", "leader-coins", fmt(u.coins)));
      list.append(li);
    });
    $("leaderboard-empty").hidden = top.length > 0;
  }

  function renderGoal(e) {
    // The host cleared the goal (docs: "LIVE goals"): nothing to show until the next one.
    if (e.cleared) { $("goal").hidden = true; return; }
    const target = Number(e.target ?? e.goal ?? e.target_coins ?? 0);
    const current = Number(e.progress ?? e.current ?? e.coins ?? e.received ?? 0);
    if (!target) return;
    $("goal").hidden = false;
    $("goal-label").textContent = (e.title || e.name || (e.gift ? giftName(e.gift) + " goal" : "Goal")) + (e.done ? " ✓" : "");
    $("goal-figures").textContent = `${fmt(current)} / ${fmt(target)}`;
    $("goal-fill").style.setProperty("--fill", Math.min(100, (100 * current) / target).toFixed(1) + "%");
    $("goal").classList.toggle("done", current >= target);
  }

  function showGift(e) {
    if (s.shown.has(e.gift_id)) return;
    s.shown.add(e.gift_id);
    const from = e.from || { id: "?", name: "someone" };
    const li = el("li", "feed-item");
    li.dataset.giftId = e.gift_id;
    const text = el("span", "feed-text");
    text.append(el("b", "who", from.name), document.createTextNode(" sent " + giftName(e.gift)));
    li.append(avatar(from, "small"), text, el("span", "feed-art", art(e.gift)), el("span", "feed-count", "×" + e.count));
    if (e.combo > 1) li.append(el("span", "combo-badge", "combo " + e.combo));
    const feed = $("feed");
    const stick = feed.scrollHeight - feed.scrollTop - feed.clientHeight < 40;
    feed.append(li);
    while (feed.children.length > FEED_MAX) feed.firstElementChild.remove();
    if (stick) feed.scrollTop = feed.scrollHeight;
    setTotals(s.coinsTotal + (e.coins || 0), s.giftsTotal + 1);
    burst(e, from);
    syncRoomSoon();
  }

  // A gift flies in on the stage with its sender and a combo counter that pops.
  function burst(e, from) {
    const layer = $("bursts");
    while (layer.children.length >= BURSTS_MAX) layer.firstElementChild.remove();
    const b = el("div", "burst" + ((e.coins || 0) >= 100 ? " big" : ""));
    const card = el("div", "burst-card");
    const words = el("span", "burst-words");
    words.append(el("b", null, from.name), el("span", null, "sent " + giftName(e.gift)));
    card.append(avatar(from, "small"), words, el("span", "burst-art", art(e.gift)));
    const n = e.combo > 1 ? e.combo : e.count;
    b.append(card, el("span", "burst-combo", "×" + n));
    layer.append(b);
    setTimeout(() => b.remove(), 3800);
  }

  function ended(text) {
    s.stopped = true;
    s.ended = true;
    clearTimeout(s.retryTimer);
    if (s.ws) s.ws.close(1000);
    setStatus("ended", "ended");
    banner(text);
    $("tray").hidden = true;
    $("end-room").disabled = true;
  }

  // -- the socket -------------------------------------------------------------------------

  function connect() {
    clearTimeout(s.retryTimer);
    if (s.stopped) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${location.host}/v1/rooms/${encodeURIComponent(s.room)}/ws?token=${encodeURIComponent(s.token)}`;
    let ws;
    try {
      ws = new WebSocket(url, ["giftstream.json"]);
    } catch {
      reconnectLater(null);
      return;
    }
    s.ws = ws;
    ws.onmessage = (m) => {
      if (ws !== s.ws || typeof m.data !== "string") return;
      let msg;
      try { msg = JSON.parse(m.data); } catch { return; }
      if (msg && typeof msg === "object") handle(msg);
    };
    ws.onclose = (ev) => {
      if (ws !== s.ws) return;
      s.ws = null;
      closed(ev);
    };
  }

  function send(msg) {
    if (s.ws && s.ws.readyState === WebSocket.OPEN) s.ws.send(JSON.stringify(msg));
  }

  function handle(msg) {
    switch (msg.type) {
      case "welcome": return welcome(msg);
      case "events": for (const e of msg.events || []) event(e); return;
      case "resume_failed": return resumeFailed(msg);
      case "ack": return ack(msg);
      case "error": return replyError(msg);
      case "wallet": return walletChanged(msg);
      default: return;
    }
  }

  function welcome(msg) {
    s.attempts = 0;
    s.you = msg.you;
    setStatus("connected");
    setViewers(msg.viewers);
    setHost(msg.host);
    $("me").textContent = msg.you ? msg.you.name : "";
    if (msg.goal) renderGoal(msg.goal); // the room's LIVE goal as it is now; `goal` events follow
    if (s.joined && s.offset !== null) {
      // Back after a drop: the gap comes first, then live events (docs: "How to resume").
      send({ type: "resume", since: s.offset, epoch: s.epoch });
    } else {
      s.joined = true;
      s.epoch = msg.epoch;
      s.offset = msg.offset;
    }
    arrange();
    for (const p of s.pending.values()) send(p.msg); // same ids: a charged gift answers as a replay
  }

  // Why a LIVE ended (the room_ended event's reason).
  const ENDED_BECAUSE = {
    host: "The host ended this LIVE.",
    admin: "This LIVE was ended by a moderator.",
    idle: "This LIVE ended: the host was away too long.",
  };

  function event(e) {
    if (e.offset !== undefined && e.offset !== null) {
      if (!newer(e.offset, s.offset)) return; // already handled, on this socket or the last one
      s.offset = e.offset;
    }
    switch (e.type) {
      case "gift": return showGift(e);
      case "presence": return setViewers(e.viewers);
      case "leaderboard": return renderLeaderboard(e.top);
      case "goal": return renderGoal(e);
      case "room_ended": return ended(ENDED_BECAUSE[e.reason] || ENDED_BECAUSE.host);
      default: return;
    }
  }

  function resumeFailed(msg) {
    // The gap can't be replayed: take the snapshot and carry on from its offset.
    s.offset = msg.offset;
    s.epoch = msg.epoch;
    setViewers(msg.viewers);
    setTotals(msg.coins_total, null);
    renderLeaderboard(msg.top_gifters);
    toast("You were away for a while: the room is shown as it is now");
    syncRoomSoon();
  }

  // The balance moved by something else than this page's own gift: a late credit, a refund, ...
  function walletChanged(msg) {
    setBalance(msg.coins);
    refreshHistorySoon();
  }

  function ack(msg) {
    const p = s.pending.get(msg.id);
    s.pending.delete(msg.id);
    setBalance(msg.balance);
    if (p) s.sent.set(msg.gift_id, p.msg);
    if (p && !p.recorded) {
      const g = s.giftsById.get(p.msg.gift);
      remember({ what: `${giftName(p.msg.gift)}${p.msg.count > 1 ? " ×" + p.msg.count : ""}`,
        coins: -(g ? g.coins * p.msg.count : 0), ts: Date.now() });
    }
  }

  function replyError(msg) {
    const p = msg.id ? s.pending.get(msg.id) : null;
    if (p && (msg.code === "unavailable" || msg.code === "rate_limited") && p.tries < 5) {
      // Unknown outcome or too fast: the same id again, later; it is never charged twice.
      p.tries++;
      setTimeout(() => { if (s.pending.has(msg.id)) send(p.msg); }, 400 * p.tries);
      return;
    }
    if (p) s.pending.delete(msg.id);
    toast(msg.message || msg.code, "bad");
    if (msg.code === "insufficient_funds" || msg.code === "budget_exceeded") {
      $("wallet").classList.add("flash");
      setTimeout(() => $("wallet").classList.remove("flash"), 1200);
      $("wallet").scrollIntoView({ behavior: "smooth", block: "nearest" });
    }
  }

  const CLOSED = {
    4401: "Your token was refused",
    4404: "This room is not live",
    4410: "The host ended this LIVE.",
    4400: "The page sent frames the server could not read",
    1009: "A message was too big for the server",
  };

  function closed(ev) {
    if (s.stopped) return;
    let advice = null;
    try { advice = JSON.parse(ev.reason); } catch { advice = null; }
    const reconnect = advice && typeof advice === "object" ? advice.reconnect !== false : ev.code !== 1009;
    if (!reconnect) {
      if (ev.code === 4410 || ev.code === 4404 && s.offset !== null) return ended(CLOSED[4410]);
      s.stopped = true;
      setStatus("disconnected");
      const why = (advice && advice.reason) || CLOSED[ev.code] || "disconnected";
      banner(`${CLOSED[ev.code] || "Disconnected"}: ${why}`);
      if (ev.code === 4401 || ev.code === 4404) leave(`${CLOSED[ev.code]} (${why}).`);
      return;
    }
    const advised = advice && Number.isFinite(advice.retry_ms) ? advice.retry_ms : null;
    reconnectLater(advised);
  }

  function reconnectLater(advisedMs) {
    setStatus("reconnecting");
    // The server's retry_ms when it gave one (already jittered per socket); otherwise a
    // capped, jittered exponential backoff.
    const base = Math.min(8000, 250 * 2 ** Math.min(s.attempts, 6));
    const delay = advisedMs !== null ? advisedMs : base * (0.5 + Math.random() / 2);
    s.attempts++;
    $("status").dataset.retryMs = String(Math.round(delay)); // for people and tests: the wait chosen
    clearTimeout(s.retryTimer);
    s.retryTimer = setTimeout(connect, delay);
  }

  window.addEventListener("online", () => {
    if (!s.stopped && !s.ws && s.attempts > 0) connect();
  });

  function sendGift(giftId, button) {
    const msg = { type: "gift", id: `web-${NONCE}-${++s.seq}`, gift: giftId, count: s.count };
    s.pending.set(msg.id, { msg, tries: 0, recorded: false });
    send(msg); // not connected: it goes out on the next welcome
    button.classList.remove("pop");
    void button.offsetWidth;
    button.classList.add("pop");
  }

  // -- joining and leaving ----------------------------------------------------------------

  const TOKENS_KEY = "giftstream.tokens";

  function recentTokens() {
    try {
      const list = JSON.parse(localStorage.getItem(TOKENS_KEY) || "[]");
      return Array.isArray(list) ? list.filter((t) => typeof t === "string") : [];
    } catch { return []; }
  }

  function rememberToken(token) {
    const list = [token, ...recentTokens().filter((t) => t !== token)].slice(0, 6);
    try { localStorage.setItem(TOKENS_KEY, JSON.stringify(list)); } catch { /* private mode */ }
  }

  function renderRecent() {
    const box = $("recent");
    box.replaceChildren();
    const now = Date.now() / 1000;
    for (const t of recentTokens()) {
      const c = claimsOf(t);
      if (!c.sub || (c.exp && c.exp < now)) continue;
      const b = el("button", "chip");
      b.type = "button";
      b.append(avatar({ id: c.sub, name: c.name || c.sub }, "tiny"),
        document.createTextNode(`${c.name || c.sub} · ${c.role || "viewer"}`));
      b.addEventListener("click", () => { $("token").value = t; });
      box.append(b);
    }
  }

  function takeToken() {
    const token = $("token").value.trim();
    const claims = claimsOf(token);
    if (!claims.sub) throw new Error("That doesn't look like a Giftstream token.");
    if (claims.exp && claims.exp < Date.now() / 1000) throw new Error("That token has expired.");
    s.token = token;
    s.claims = claims;
    rememberToken(token);
    return token;
  }

  async function enter(room) {
    s.room = room;
    s.stopped = false;
    s.ended = false;
    s.joined = false;
    s.offset = null;
    s.epoch = null;
    s.shown.clear();
    s.pending.clear();
    s.you = { id: s.claims.sub, name: s.claims.name || s.claims.sub, role: s.claims.role || "viewer" };
    s.host = null;
    sessionStorage.setItem("giftstream.token", s.token);
    history.replaceState(null, "", "/demo?room=" + encodeURIComponent(room));
    $("join-view").hidden = true;
    $("room-view").hidden = false;
    $("leave").hidden = false;
    $("feed").replaceChildren();
    $("bursts").replaceChildren();
    $("end-room").disabled = false;
    $("me").textContent = s.you.name;
    banner("");
    setTotals(0, 0);
    setStatus("connecting");
    arrange();
    // The catalog first, so the first events already show gift names and prices.
    await loadCatalog().catch((err) => toast(err.message, "bad"));
    connect();
    await Promise.all([refreshWallet().catch((err) => toast(err.message, "bad")), refreshRoom()]);
  }

  function leave(message) {
    s.stopped = true;
    clearTimeout(s.retryTimer);
    if (s.ws) { const ws = s.ws; s.ws = null; ws.close(1000); }
    $("room-view").hidden = true;
    $("join-view").hidden = false;
    $("leave").hidden = true;
    setStatus("idle", "offline");
    $("join-error").textContent = message || "";
    history.replaceState(null, "", "/demo");
    renderRecent();
  }

  async function join(ev) {
    if (ev) ev.preventDefault();
    $("join-error").textContent = "";
    try {
      takeToken();
      const room = $("room").value.trim();
      if (!room) throw new Error("Which room? Type its id (the banner's demo room is “demo”).");
      await enter(room);
    } catch (err) {
      $("join-error").textContent = err.message;
    }
  }

  async function openRoom() {
    $("join-error").textContent = "";
    try {
      takeToken();
      let room;
      try {
        room = (await retrying(() => api("POST", "/v1/rooms", {}))).room_id;
      } catch (err) {
        // One live room per host: a host who is live already goes back to that room.
        if (!(err instanceof ApiError && err.code === "already_live" && err.body.room_id)) throw err;
        room = err.body.room_id;
        toast("You are live already: back to your room", "good");
      }
      $("room").value = room;
      await enter(room);
    } catch (err) {
      $("join-error").textContent = err.message;
    }
  }

  async function endRoom() {
    if (!confirm("End this LIVE for everyone?")) return;
    try {
      await api("POST", `/v1/rooms/${encodeURIComponent(s.room)}/end`);
    } catch (err) {
      toast(err.message, "bad");
    }
  }

  function start() {
    $("join-form").addEventListener("submit", join);
    $("open-room").addEventListener("click", openRoom);
    $("leave").addEventListener("click", () => leave(""));
    $("end-room").addEventListener("click", endRoom);
    $("wallet-chip").addEventListener("click", () => {
      if (!$("room-view").hidden) $("wallet").scrollIntoView({ behavior: "smooth", block: "nearest" });
    });
    $("copy-share").addEventListener("click", async () => {
      try { await navigator.clipboard.writeText($("share").value); toast("Link copied", "good"); } catch {
        $("share").select();
      }
    });
    for (const b of document.querySelectorAll(".count")) {
      b.addEventListener("click", () => {
        s.count = Number(b.dataset.count);
        for (const o of document.querySelectorAll(".count")) o.classList.toggle("on", o === b);
      });
    }
    renderRecent();
    // /demo?room=<room_id>&token=<jwt> opens that room; the token then leaves the address bar.
    const q = new URLSearchParams(location.search);
    const token = q.get("token") || sessionStorage.getItem("giftstream.token") || "";
    if (q.get("room")) $("room").value = q.get("room");
    if (token) $("token").value = token;
    if (q.has("token")) history.replaceState(null, "", "/demo" + (q.get("room") ? "?room=" + encodeURIComponent(q.get("room")) : ""));
    if (q.get("room") && token) join(null);
  }

  start();
})();
