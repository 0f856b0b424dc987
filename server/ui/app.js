// The edge-ota dashboard: one page with three views (rollouts, devices,
// releases) and a device page, drawn from the admin API the CLI uses.
//
// Why it is written this way:
// - No build step and no framework: the file is embedded in ota-server as
//   is (include_str!), so what runs is what is reviewed.
// - Every string from the server goes into the DOM as text (el() never sets
//   innerHTML): device ids, tags and failure reasons come from devices.
// - The pages poll every POLL_MS (<= 2 s) while visible; the admin API
//   answers from the rollout engine's counters, never from a fleet scan.
//   The device list is the exception: finding a filtered page (and its
//   total) is a scan of the inventory on sled (~100 ms at 100,000 devices
//   in a debug build), and 20 such pages rescanning every 1.5 s cut
//   check-ins from 5,700/s to 900/s (tests/ui_load.rs). So the rows shown
//   are refreshed every POLL_MS by id (`ids=`, point lookups: state,
//   version, last seen; a row that stops matching the filter leaves), and
//   the page itself (which devices, the total) every DEVICE_LIST_MS and on
//   its Refresh button.
const DEVICE_LIST_MS = 15000;
// - The UI hides what the role may not do, but the API decides: a refused
//   request shows the API's own message.
'use strict';

const POLL_MS = 1500;
const PAGE_SIZE = 50;
const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };
const S = { me: null, timer: null, route: null };

// ---------- helpers ----------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    // Through the CSSOM: the CSP refuses style attributes in markup.
    else if (k === 'width') e.style.width = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function may(role) {
  return S.me && ROLE_RANK[S.me.role] >= ROLE_RANK[role];
}

// Calls the admin API with the session cookie; changes carry the CSRF token.
// Throws an Error whose message is the API's own `error` text.
async function api(method, path, body) {
  const headers = {};
  if (method !== 'GET') headers['X-CSRF-Token'] = S.me ? S.me.csrf : '';
  const opt = { method, credentials: 'same-origin', headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    opt.body = JSON.stringify(body);
  }
  const r = await fetch(path, opt);
  const text = await r.text();
  let j = null;
  try { j = JSON.parse(text); } catch (_) { /* not JSON */ }
  if (r.status === 401) {
    location.href = '/ui/login';
    throw new Error('not signed in');
  }
  if (!r.ok) throw new Error(j && j.error ? j.error : `HTTP ${r.status}: ${text}`);
  return j;
}

function banner(msg) {
  const b = document.getElementById('banner');
  b.textContent = msg || '';
  b.hidden = !msg;
}

function ago(ms) {
  if (!ms) return 'never';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function left(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return (h ? `${h} h ` : '') + (h || m ? `${m} min ` : '') + `${r} s`;
}

function bytes(n) {
  if (n === undefined || n === null) return '-';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0, x = n;
  while (x >= 1024 && i < u.length - 1) { x /= 1024; i++; }
  return i ? `${x.toFixed(1)} ${u[i]}` : `${n} B`;
}

function pct(x) { return `${(100 * x).toFixed(x < 0.1 ? 1 : 0)} %`; }

function tagText(tags) {
  const t = Object.entries(tags || {}).map(([k, v]) => `${k}=${v}`);
  return t.length ? t.join(', ') : '-';
}

// A confirmation dialog; resolves to the reason typed (or '') or null.
function confirmDialog(text, withReason) {
  return new Promise((resolve) => {
    const m = document.getElementById('modal');
    const reason = document.getElementById('modal-reason');
    document.getElementById('modal-text').textContent = text;
    reason.value = '';
    reason.hidden = !withReason;
    document.getElementById('modal-reason-label').hidden = !withReason;
    m.hidden = false;
    if (withReason) reason.focus();
    const done = (v) => {
      m.hidden = true;
      ok.removeEventListener('click', onOk);
      cancel.removeEventListener('click', onCancel);
      resolve(v);
    };
    const ok = document.getElementById('modal-confirm');
    const cancel = document.getElementById('modal-cancel');
    const onOk = () => done(reason.value);
    const onCancel = () => done(null);
    ok.addEventListener('click', onOk);
    cancel.addEventListener('click', onCancel);
  });
}

// ---------- routing and polling ----------

function poll(fn, everyMs = POLL_MS) {
  clearTimeout(S.timer);
  const route = S.route;
  const tick = async () => {
    if (S.route !== route) return;
    if (!document.hidden) {
      try {
        await fn();
        banner('');
      } catch (e) {
        banner(`could not refresh: ${e.message}`);
      }
    }
    if (S.route === route) S.timer = setTimeout(tick, everyMs);
  };
  tick();
}

function route() {
  const h = location.hash || '#/rollouts';
  S.route = h;
  clearTimeout(S.timer);
  banner('');
  const page = document.getElementById('page');
  page.replaceChildren();
  for (const a of document.querySelectorAll('nav a')) {
    a.classList.toggle('active', h.startsWith(a.getAttribute('href')));
  }
  const [path, query] = h.slice(1).split('?');
  const params = new URLSearchParams(query || '');
  if (path.startsWith('/device/')) return devicePage(page, decodeURIComponent(path.slice(8)));
  if (path === '/devices') return devicesPage(page, params);
  if (path === '/releases') return releasesPage(page);
  return rolloutsPage(page);
}

async function main() {
  try {
    const r = await fetch('/ui/session', { credentials: 'same-origin' });
    if (!r.ok) { location.href = '/ui/login'; return; }
    S.me = await r.json();
  } catch (e) {
    banner(`the server could not be reached: ${e}`);
    return;
  }
  document.getElementById('whoami').textContent = `${S.me.name} (${S.me.role})`;
  document.body.dataset.role = S.me.role;
  document.getElementById('sign-out').addEventListener('click', async () => {
    await api('POST', '/ui/logout').catch(() => {});
    location.href = '/ui/login';
  });
  window.addEventListener('hashchange', route);
  route();
}

// ---------- rollouts ----------

function rolloutsPage(page) {
  const list = el('div', { id: 'rollouts' });
  page.append(el('h2', {}, 'Rollouts'), list);
  if (may('operator')) page.append(createForm(list));
  poll(async () => {
    // Up to 1 s old: every open dashboard shares one computation per second
    // (admin::rollout_list).
    const all = await api('GET', '/api/v1/admin/rollouts?max_age_ms=1000');
    all.sort((a, b) => b.created_at_ms - a.created_at_ms);
    list.replaceChildren(...(all.length ? all.map(rolloutCard)
      : [el('p', { class: 'empty' }, 'No rollouts yet.' + (may('operator') ? ' Create one below.' : ''))]));
  });
}

// Segments of a wave's bar, in the order drawn.
// `in_progress`, `cancelled` and `waiting` (to retry) are members in those
// phases now, counted by the server; `committed`, `failed` and
// `rolled_back` are final. In progress is not derived from `admitted`:
// that counts attempts while the server runs and members after a restart,
// and the difference showed "in progress 0" beside leases held.
function segments(w) {
  const committed = w.committed + w.already_current;
  const finished = committed + w.failed + w.rolled_back + w.cancelled;
  const inProgress = Math.max(0, Math.min(w.eligible - finished, w.in_progress));
  const done = finished + inProgress;
  return [
    ['committed', committed],
    ['failed', w.failed],
    ['rolled-back', w.rolled_back],
    ['in-progress', inProgress],
    ['waiting', Math.max(0, w.eligible - done)],
  ];
}

function waveBar(w) {
  const segs = segments(w);
  const total = Math.max(1, w.eligible);
  const bar = el('div', { class: 'bar', title: segs.map(([k, n]) => `${k} ${n}`).join(', ') },
    segs.filter(([, n]) => n > 0).map(([k, n]) =>
      el('span', { class: `seg ${k}`, width: `${(100 * n / total).toFixed(2)}%` })));
  const legend = segs.map(([k, n]) => el('span', { class: `count ${k}` }, `${k.replace('-', ' ')} ${n}`));
  // `wave` counts from 1 in a status (as `rollout status` shows it).
  return el('div', { class: 'wave', 'data-wave': w.wave },
    el('span', { class: 'wave-name' }, `wave ${w.wave} · ${w.percent} %`, w.open ? '' : ' (not open)'),
    bar, el('div', { class: 'legend' }, legend, el('span', {}, `of ${w.eligible}`)));
}

function rolloutCard(s) {
  const t = s.waves.reduce((a, w) => {
    a.committed += w.committed + w.already_current;
    a.failed += w.failed + w.rolled_back;
    return a;
  }, { committed: 0, failed: 0 });
  const outcomes = t.committed + t.failed;
  const rate = outcomes ? t.failed / outcomes : 0;
  const spec = s.spec;
  const target = spec.group ? `group ${spec.group}` : `${spec.device_type}${Object.keys(spec.selector || {}).length ? ` [${tagText(spec.selector)}]` : ''}`;
  const facts = el('dl', { class: 'facts' },
    el('dt', {}, 'Download leases'),
    el('dd', { class: 'leases' }, `${s.active_leases} / ${spec.max_concurrent}`,
      el('meter', { min: 0, max: spec.max_concurrent, value: s.active_leases }),
      s.queued ? ` (${s.queued} queued)` : ''),
    el('dt', {}, 'Start rate'),
    el('dd', { class: 'rate' }, `${s.starts_per_min_now.toFixed(1)} / min now, limit ${spec.max_starts_per_min} / min`
      + (spec.ramp_factor > 1 ? ` (ramps ×${spec.ramp_factor})` : '')),
    el('dt', {}, 'Failures'),
    el('dd', { class: 'failures' + (outcomes >= spec.min_sample && rate >= spec.failure_threshold ? ' bad' : '') },
      `${t.failed} of ${outcomes} outcomes (${pct(rate)}); threshold ${pct(spec.failure_threshold)}`
      + ` after ${spec.min_sample} outcomes, then ${spec.on_failure}`),
  );
  if (s.next_wave || s.soak_ends_at_ms) {
    facts.append(el('dt', {}, 'Next wave'),
      el('dd', { class: 'next-wave' }, s.next_wave || '',
        s.soak_ends_at_ms && s.soak_ends_at_ms > Date.now()
          ? el('span', { class: 'soak' }, ` · soak ends in ${left(s.soak_ends_at_ms - Date.now())}`) : ''));
  }
  if (s.next_window) facts.append(el('dt', {}, 'Next window'), el('dd', {}, s.next_window));
  const reasons = s.failure_reasons && s.failure_reasons.length
    ? el('ul', { class: 'failure-reasons' }, s.failure_reasons.map((r) => el('li', {}, `${r.devices} × ${r.reason}`)))
    : '';
  const actions = el('div', { class: 'actions' });
  if (may('operator')) {
    const act = async (verb, text, withReason) => {
      const reason = await confirmDialog(text, withReason);
      if (reason === null) return;
      try {
        await api('POST', `/api/v1/admin/rollouts/${encodeURIComponent(s.id)}/${verb}`,
          reason ? { reason } : undefined);
        banner('');
      } catch (e) {
        banner(`${verb} ${s.id}: ${e.message}`);
      }
    };
    if (s.state === 'active') actions.append(el('button', { class: 'pause', onclick: () => act('pause', `Pause rollout ${s.id}? Devices mid-update finish; no new ones start.`, true) }, 'Pause'));
    if (s.state === 'paused') actions.append(el('button', { class: 'resume', onclick: () => act('resume', `Resume rollout ${s.id}?`, true) }, 'Resume'));
    if (s.state === 'active' || s.state === 'paused') actions.append(el('button', { class: 'abort danger', onclick: () => act('abort', `Abort rollout ${s.id}? This cannot be undone.`, true) }, 'Abort'));
  }
  return el('section', { class: `rollout state-${s.state}`, id: `rollout-${s.id}`, 'data-id': s.id },
    el('h3', {}, el('span', { class: 'rid' }, s.id), ` release ${spec.release} → ${target} `,
      el('span', { class: `badge ${s.state}` }, s.state), el('small', {}, ` created ${ago(s.created_at_ms)}`)),
    s.reason ? el('p', { class: 'reason' }, s.reason) : '',
    el('div', { class: 'waves' }, s.waves.map(waveBar)),
    facts, reasons, actions);
}

// The create form posts the same JSON as `ota-server rollout create` and
// shows the API's answer verbatim: the API is the one validator.
function createForm(list) {
  const f = (id, label, attrs) => el('label', { for: id }, label, el('input', { id, name: id, ...attrs }));
  const msg = el('p', { id: 'create-result', class: 'error', role: 'alert' });
  const form = el('form', { id: 'create-rollout', class: 'create' },
    el('h3', {}, 'New rollout'),
    f('c-release', 'Release', { required: true, placeholder: '2.0' }),
    f('c-device-type', 'Device type', { placeholder: 'rpi4 (or give a group)' }),
    f('c-group', 'Group', { placeholder: 'optional' }),
    f('c-selector', 'Tags (KEY=VALUE,...)', { placeholder: 'optional' }),
    f('c-waves', 'Waves (cumulative %)', { value: '10,50,100' }),
    f('c-soak', 'Soak per wave (s)', { value: '600' }),
    f('c-max-concurrent', 'Max concurrent downloads', { value: '100' }),
    f('c-rate', 'Max starts per minute', { value: '60' }),
    f('c-failure', 'Failure threshold (0-1)', { value: '0.05' }),
    f('c-min-sample', 'Min outcomes before judging', { value: '20' }),
    el('label', { for: 'c-on-failure' }, 'On failure',
      el('select', { id: 'c-on-failure' }, el('option', { value: 'pause' }, 'pause'), el('option', { value: 'abort' }, 'abort'))),
    el('button', { id: 'c-submit', type: 'submit' }, 'Create rollout'), msg);
  // A number field keeps what was typed when it is not a number, so the
  // API's parse error (not ours) names the problem.
  const num = (id) => {
    const v = document.getElementById(id).value.trim();
    return v !== '' && Number.isFinite(Number(v)) ? Number(v) : v;
  };
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    msg.textContent = '';
    const val = (id) => document.getElementById(id).value.trim();
    const selector = {};
    for (const kv of val('c-selector').split(',').map((x) => x.trim()).filter(Boolean)) {
      const i = kv.indexOf('=');
      if (i < 0) { msg.textContent = `tag ${JSON.stringify(kv)}: expected KEY=VALUE`; return; }
      selector[kv.slice(0, i)] = kv.slice(i + 1);
    }
    const spec = {
      release: val('c-release'),
      waves: val('c-waves').split(',').map((x) => x.trim()).filter(Boolean).map((x) => (Number.isFinite(Number(x)) ? Number(x) : x)),
      soak_ms: typeof num('c-soak') === 'number' ? Math.round(num('c-soak') * 1000) : num('c-soak'),
      max_concurrent: num('c-max-concurrent'),
      max_starts_per_min: num('c-rate'),
      failure_threshold: num('c-failure'),
      min_sample: num('c-min-sample'),
      on_failure: val('c-on-failure'),
      selector,
    };
    if (val('c-device-type')) spec.device_type = val('c-device-type');
    if (val('c-group')) spec.group = val('c-group');
    try {
      const st = await api('POST', '/api/v1/admin/rollouts', spec);
      msg.className = 'ok';
      msg.textContent = `rollout ${st.id} created`;
    } catch (e) {
      msg.className = 'error';
      msg.textContent = e.message;
    }
  });
  return form;
}

// ---------- devices ----------

const FILTERS = [
  ['device_type', 'Device type'], ['version', 'Version'], ['tags', 'Tags (KEY=VALUE,...)'],
  ['state', 'State'], ['rollout', 'Rollout'], ['seen_within_s', 'Seen within (s)'], ['silent_for_s', 'Silent for (s)'],
];

function devicesPage(page, params) {
  const form = el('form', { id: 'device-filter', class: 'filters' },
    FILTERS.map(([k, label]) => k === 'state'
      ? el('label', {}, label, el('select', { name: k },
        ['', 'idle', 'downloading', 'installing', 'rebooting', 'testing', 'never'].map((s) =>
          el('option', { value: s, selected: params.get(k) === s }, s || 'any'))))
      : el('label', {}, label, el('input', { name: k, value: params.get(k) || '' }))),
    el('button', { type: 'submit' }, 'Filter'));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) q.set(k, v);
    location.hash = `#/devices?${q}`;
  });
  const summary = el('p', { id: 'device-total' });
  const table = el('table', { id: 'devices', class: 'grid' });
  const pager = el('div', { class: 'pager' });
  const refresh = el('button', { id: 'refresh', type: 'button', onclick: () => route() }, 'Refresh');
  page.append(el('h2', {}, 'Devices'), form, summary, table, pager);
  // Keyset paging: `after` is the last id of the previous page; the stack
  // of cursors lets "previous" go back without offsets.
  const cursors = (params.get('trail') || '').split('|').filter(Boolean);
  const q = new URLSearchParams();
  for (const [k] of FILTERS) if (params.get(k)) q.set(k, params.get(k));
  q.set('limit', PAGE_SIZE);
  if (cursors.length) q.set('after', cursors[cursors.length - 1]);
  const go = (trail) => {
    const p = new URLSearchParams(params);
    if (trail.length) p.set('trail', trail.join('|')); else p.delete('trail');
    location.hash = `#/devices?${p}`;
  };
  // The page (ids, total, next) from the last full query, and when.
  let shown = null;
  let listedAt = 0;
  poll(async () => {
    const t0 = performance.now();
    const full = !shown || performance.now() - listedAt >= DEVICE_LIST_MS;
    let r;
    if (full) {
      r = await api('GET', `/api/v1/admin/devices?${q}`);
      shown = { ids: r.devices.map((d) => d.id), total: r.total, next: r.next, at: new Date() };
      listedAt = performance.now();
    } else if (shown.ids.length) {
      const rows = new URLSearchParams(q);
      rows.delete('after');
      rows.set('ids', shown.ids.join(','));
      r = await api('GET', `/api/v1/admin/devices?${rows}`);
      r.next = shown.next;
    } else {
      r = { devices: [], next: shown.next };
    }
    const ms = Math.round(performance.now() - t0);
    const first = cursors.length * PAGE_SIZE;
    summary.textContent = `${shown.total} device(s) match; rows ${r.devices.length ? first + 1 : 0}–${first + r.devices.length} (${ms} ms)`;
    table.replaceChildren(
      el('tr', {}, ['Device', 'Type', 'Version', 'State', 'Slot', 'Last seen', 'Tags'].map((h) => el('th', {}, h))),
      ...r.devices.map((d) => el('tr', {},
        el('td', {}, el('a', { href: `#/device/${encodeURIComponent(d.id)}`, class: 'device-link' }, d.id)),
        el('td', {}, d.device_type), el('td', {}, d.version || '-'),
        el('td', {}, d.last_seen_ms ? (d.state || '-') : 'never seen'), el('td', {}, d.booted_slot || '-'),
        el('td', {}, ago(d.last_seen_ms)), el('td', {}, tagText(d.tags)))));
    pager.replaceChildren(
      el('button', { id: 'prev', disabled: !cursors.length, onclick: () => go(cursors.slice(0, -1)) }, '← Previous'),
      el('button', { id: 'next', disabled: !r.next, onclick: () => go([...cursors, r.next]) }, 'Next →'),
      refresh, el('span', { class: 'hint' },
        ` rows refreshed ${new Date().toLocaleTimeString()} (every ${POLL_MS / 1000} s); list and total ${shown.at.toLocaleTimeString()} (every ${DEVICE_LIST_MS / 1000} s)`));
  });
}

function devicePage(page, id) {
  const head = el('div', { id: 'device-attrs' });
  const attempts = el('table', { id: 'attempts', class: 'grid' });
  const events = el('table', { id: 'history', class: 'grid' });
  page.append(el('p', {}, el('a', { href: '#/devices' }, '← Devices')), el('h2', {}, `Device ${id}`), head,
    el('h3', {}, 'Update attempts'), attempts, el('h3', {}, 'Event history (newest first)'), events);
  const path = `/api/v1/admin/devices/${encodeURIComponent(id)}`;
  poll(async () => {
    const [v, h] = await Promise.all([api('GET', path), api('GET', `${path}/history?limit=200&progress=true`)]);
    head.replaceChildren(el('dl', { class: 'facts' },
      el('dt', {}, 'Type'), el('dd', {}, v.device_type),
      el('dt', {}, 'Version'), el('dd', { id: 'device-version' }, v.version || '-'),
      el('dt', {}, 'State'), el('dd', {}, v.last_seen_ms ? (v.state || '-') : 'never seen'),
      el('dt', {}, 'Booted slot'), el('dd', {}, v.booted_slot || '-'),
      el('dt', {}, 'Last seen'), el('dd', {}, ago(v.last_seen_ms)),
      el('dt', {}, 'Tags'), el('dd', {}, tagText(v.tags))));
    attempts.replaceChildren(
      el('tr', {}, ['Update', 'Wave', 'Phase', 'Attempt', 'Download', 'Reason'].map((x) => el('th', {}, x))),
      ...(h.attempts || []).map((m) => el('tr', { class: `phase-${m.phase}` },
        el('td', {}, m.update_id), el('td', {}, m.wave + 1), el('td', {}, m.phase), el('td', {}, m.attempt),
        el('td', {}, m.artifacts ? `${m.artifacts.from_version ? `delta from ${m.artifacts.from_version}` : 'full'}, ${bytes(m.artifacts.payload_size)}` : '-'),
        el('td', {}, m.reason || ''))));
    events.replaceChildren(
      el('tr', {}, ['#', 'Update', 'Event', 'Device time', 'Detail'].map((x) => el('th', {}, x))),
      ...(h.events || []).map((e) => el('tr', { class: `event-${e.kind}` },
        el('td', {}, e.seq), el('td', {}, e.update_id), el('td', { class: 'kind' }, e.kind), el('td', {}, e.at),
        el('td', {}, detailText(e.detail)))));
  });
}

function detailText(d) {
  if (!d) return '';
  return Object.entries(d).filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`).join('; ');
}

// ---------- releases ----------

function releasesPage(page) {
  const box = el('div', { id: 'releases' });
  page.append(el('h2', {}, 'Releases'), box);
  poll(async () => {
    const all = await api('GET', '/api/v1/admin/releases');
    const byType = new Map();
    for (const r of all) {
      if (!byType.has(r.device_type)) byType.set(r.device_type, []);
      byType.get(r.device_type).push(r);
    }
    if (!all.length) {
      box.replaceChildren(el('p', { class: 'empty' }, 'No releases yet: `ota-server release add`.'));
      return;
    }
    box.replaceChildren(...[...byType].map(([type, rs]) => el('section', { class: 'release-type' },
      el('h3', {}, type),
      el('table', { class: 'grid' },
        el('tr', {}, ['Version', 'Added', 'Security counter', 'Image', 'Payload', 'From', 'Build', 'Build time', 'Codecs'].map((x) => el('th', {}, x))),
        rs.slice().reverse().flatMap((r) => (r.bundle ? [{ bundle: true }] : r.builds).map((b, i) => el('tr', { class: `build-${b.status || 'bundle'}` },
          el('td', {}, i === 0 ? r.version : ''),
          el('td', {}, i === 0 ? ago(r.created_at_ms) : ''),
          el('td', {}, i === 0 ? r.security_counter : ''),
          el('td', {}, i === 0 ? bytes(r.image_size) : ''),
          el('td', {}, b.bundle ? `bundle ${r.bundle.format || ''}` : b.artifacts ? bytes(b.artifacts.manifest_size + b.artifacts.payload_size) : '-'),
          el('td', {}, b.bundle ? '' : b.from_version ? `delta from ${b.from_version}` : 'full image'),
          el('td', { class: 'status' }, b.bundle ? 'stored' : b.status + (b.error ? `: ${b.error}` : '')
            + (b.progress ? ` (${b.progress.phase} ${bytes(b.progress.done_bytes)} / ${bytes(b.progress.total_bytes)})` : '')),
          el('td', {}, b.seconds !== undefined && b.seconds !== null ? `${b.seconds.toFixed(1)} s` : '-'),
          el('td', {}, b.artifacts && b.artifacts.codecs ? b.artifacts.codecs.join(', ') : ''))))))));
  });
}

main();
