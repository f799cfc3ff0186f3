// Native stand-ins for the host, for unit tests of plugin logic under Node.js 20+: in-memory kv,
// captured logs, published messages, emails and SMS, a settable config and identity, and a way
// to make the next capability call fail. Load it before the plugin:
//   node --import ./testing.js --test
// It registers module hooks that serve the `wasmq:plugin/*` imports from these fakes (and the
// SDK modules themselves to a plugin that does not have them beside it).

import { register } from 'node:module';

// Interface -> the functions componentize-js binds for it (names as in JS).
const INTERFACES = {
  log: ['log', 'logUtf8'],
  kv: ['get', 'set', 'delete', 'listKeys'],
  publish: ['send'],
  context: ['identity', 'config'],
  email: ['send'],
  sms: ['send'],
  http: ['send'],
};

const HOOKS = `
const INTERFACES = ${JSON.stringify(INTERFACES)};
const SDK = ${JSON.stringify(new URL('./', import.meta.url).href)};
export async function resolve(specifier, context, next) {
  if (specifier.startsWith('wasmq:plugin/')) return { url: specifier, shortCircuit: true };
  try {
    return await next(specifier, context);
  } catch (e) {
    const file = specifier.split('/').pop();
    if (e.code === 'ERR_MODULE_NOT_FOUND' && (file === 'wasmq.js' || file === 'testing.js')) {
      return { url: SDK + file, shortCircuit: true };
    }
    throw e;
  }
}
export async function load(url, context, next) {
  if (!url.startsWith('wasmq:plugin/')) return next(url, context);
  const iface = url.slice('wasmq:plugin/'.length).split('@')[0];
  const names = INTERFACES[iface] || [];
  const source = names
    .map((n, i) => 'const f' + i + ' = (...a) => globalThis.__wasmqFake.' + iface + '.' + n + '(...a);' +
      ' export { f' + i + ' as ' + n + ' };')
    .join('\\n');
  return { format: 'module', source, shortCircuit: true };
}
`;
register('data:text/javascript,' + encodeURIComponent(HOOKS));

const decoder = new TextDecoder();
let state;

// A failed host call, shaped as componentize-js throws it.
function hostError(kind, message) {
  const e = new Error(`${kind}: ${message}`);
  e.payload = { tag: kind, val: message };
  return e;
}

function effect() {
  const failure = state.failure;
  state.failure = null;
  if (failure) throw failure;
}

/** Forgets all fake state. */
export function reset() {
  state = {
    kv: new Map(),
    logs: [],
    published: [],
    emails: [],
    sms: [],
    requests: [],
    config: '{}',
    identity: { group: 'test', plugin: 'test', pluginVersion: 1, instanceIndex: 0, instanceCount: 1 },
    failure: null,
    response: { status: 200, headers: [], body: new Uint8Array() },
  };
}
reset();

globalThis.__wasmqFake = {
  log: {
    log: (level, message) => state.logs.push([level, message]),
    logUtf8: (level, bytes) => state.logs.push([level, decoder.decode(bytes)]),
  },
  kv: {
    get: (key) => state.kv.get(key),
    set: (key, value) => void state.kv.set(key, new Uint8Array(value)),
    delete: (key) => void state.kv.delete(key),
    listKeys: (prefix, limit) => [...state.kv.keys()].filter((k) => k.startsWith(prefix)).sort().slice(0, limit),
  },
  publish: {
    send(message) {
      effect();
      state.published.push({ ...message, body: decoder.decode(message.body) });
      return `00000000-0000-7000-8000-${String(state.published.length).padStart(12, '0')}`;
    },
  },
  context: { identity: () => state.identity, config: () => state.config },
  email: {
    send(to, subject, text, html) {
      effect();
      state.emails.push([to, subject, text, html]);
    },
  },
  sms: {
    send(to, text) {
      effect();
      state.sms.push([to, text]);
    },
  },
  http: {
    send(req) {
      effect();
      state.requests.push(req);
      return state.response;
    },
  },
};

/** The subscription config the plugin sees: an object (encoded as JSON) or JSON text. */
export function setConfig(config) {
  state.config = typeof config === 'string' ? config : JSON.stringify(config);
}

export function setIdentity(identity) {
  state.identity = { ...state.identity, ...identity };
}

/** The next side effect (email, sms, publish, http) fails with this error kind. */
export function failNext(kind, message = 'test failure') {
  state.failure = hostError(kind, message);
}

/** A raw message as the host delivers it, with this body (objects become JSON). */
export function message(body, fields = {}) {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  return {
    id: '00000000-0000-7000-8000-000000000001',
    topic: 'test',
    queue: 0,
    offset: 0n,
    properties: [],
    body: new TextEncoder().encode(text),
    bornAt: 0n,
    attempt: 1,
    ...fields,
  };
}

export const logs = () => [...state.logs];
/** Published messages, bodies as text. */
export const published = () => [...state.published];
/** [to, subject, text, html] of each email sent. */
export const emails = () => [...state.emails];
/** [to, text] of each SMS sent. */
export const sms = () => [...state.sms];
export const kv = () => new Map(state.kv);
