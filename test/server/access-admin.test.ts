import { existsSync, mkdirSync, mkdtempSync, readdirSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import type { SoppuServer } from '../../src/server/create-server.js';
import { parseTar, writeAdapterFiles } from '../../src/server/tar-extract.js';
import { FakeEngine } from './fake-engine.js';
import { AccessControl } from '../../src/server/access-control.js';
import { KEYS, keysJson, testServer } from './helpers.js';

let server: SoppuServer | null = null;
afterEach(async () => {
  await server?.app.close();
  server = null;
});

/** A ustar archive of the given files (written by hand, as a client would with `tar cf`). */
function tarOf(files: Record<string, string>, extra: { type?: string; name?: string }[] = []): Buffer {
  const blocks: Buffer[] = [];
  const header = (name: string, size: number, type: string): Buffer => {
    const h = Buffer.alloc(512);
    h.write(name, 0, 100);
    h.write('0000644\0', 100);
    h.write('0000000\0', 108);
    h.write('0000000\0', 116);
    h.write(`${size.toString(8).padStart(11, '0')}\0`, 124);
    h.write('00000000000\0', 136);
    h.write('        ', 148);
    h.write(type, 156);
    h.write('ustar\0', 257);
    h.write('00', 263);
    let sum = 0;
    for (const b of h) sum += b;
    h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148);
    return h;
  };
  for (const [name, content] of Object.entries(files)) {
    const data = Buffer.from(content);
    blocks.push(header(name, data.length, '0'), data, Buffer.alloc((512 - (data.length % 512)) % 512));
  }
  for (const e of extra) blocks.push(header(e.name ?? 'x', 0, e.type ?? '0'));
  blocks.push(Buffer.alloc(1024));
  return Buffer.concat(blocks);
}

const ADAPTERS = ['alice-1', 'alice-2', 'bob-1', 'carol-1'];
const CALLERS = { none: undefined, bad: 'sk-wrong-000000', admin: KEYS.admin, alice: KEYS.alice, bob: KEYS.bob } as const;
const ALLOWED: Record<string, (id: string) => boolean> = {
  admin: () => true,
  alice: (id) => id.startsWith('alice-'),
  bob: (id) => id === 'bob-1',
};

function generationRoutes(adapterId: string): { url: string; payload: Record<string, unknown> }[] {
  return [
    { url: '/generate', payload: { inputs: 'hi', parameters: { adapter_id: adapterId, max_new_tokens: 2 } } },
    { url: '/generate_stream', payload: { inputs: 'hi', parameters: { adapter_id: adapterId, max_new_tokens: 2 } } },
    { url: '/', payload: { inputs: 'hi', parameters: { adapter_id: adapterId, max_new_tokens: 2 } } },
    { url: '/v1/completions', payload: { model: adapterId, prompt: 'hi', max_tokens: 2 } },
    { url: '/v1/chat/completions', payload: { model: adapterId, messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 } },
  ];
}

describe('access control', () => {
  it('every key × every adapter × every generation route', async () => {
    const engine = new FakeEngine({ adapters: ADAPTERS });
    server = testServer(engine, { auth: true });
    for (const [callerName, key] of Object.entries(CALLERS)) {
      const headers = key ? { authorization: `Bearer ${key}` } : {};
      for (const adapterId of [...ADAPTERS, 'missing-1']) {
        for (const route of generationRoutes(adapterId)) {
          const response = await server.app.inject({ method: 'POST', url: route.url, payload: route.payload, headers });
          const where = `${callerName} ${adapterId} ${route.url}`;
          if (key === undefined || callerName === 'bad') {
            expect(response.statusCode, where).toBe(401);
          } else if (adapterId !== 'missing-1' && ALLOWED[callerName]!(adapterId)) {
            expect(response.statusCode, where).toBe(200);
          } else {
            expect(response.statusCode, where).toBe(404);
            // the same body whether the id exists or not: ids do not leak
            const message = route.url.startsWith('/v1/') ? response.json().error.message : response.json().error;
            expect(message, where).toBe(`Adapter '${adapterId}' not found`);
          }
        }
      }
      // the base model is open to every valid key
      const baseResponse = await server.app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hi', parameters: { max_new_tokens: 1 } }, headers });
      expect(baseResponse.statusCode).toBe(key === undefined || callerName === 'bad' ? 401 : 200);
      // /v1/models lists only what the caller may use
      const models = await server.app.inject({ method: 'GET', url: '/v1/models', headers });
      if (key === undefined || callerName === 'bad') {
        expect(models.statusCode).toBe(401);
        expect(models.json().error.type).toBe('authentication_error');
      } else {
        const ids = models.json().data.map((m: { id: string }) => m.id).sort();
        expect(ids).toEqual(['fake/tiny', ...ADAPTERS.filter((id) => ALLOWED[callerName]!(id))].sort());
      }
      // admin routes: 401 without a key, 403 for user keys
      for (const [method, url] of [['GET', '/adapters'], ['GET', '/metrics'], ['DELETE', '/adapters/alice-1']] as const) {
        const response = await server.app.inject({ method, url, headers });
        const expected = key === undefined || callerName === 'bad' ? 401 : callerName === 'admin' ? (method === 'DELETE' ? 204 : 200) : 403;
        expect(response.statusCode, `${callerName} ${method} ${url}`).toBe(expected);
        if (method === 'DELETE' && expected === 204) engine.adapters.set('alice-1', { id: 'alice-1', source: 'bank', storage: 'compressed', tier: 'disk', pinned: false, bytes: 1, version: 0 });
      }
    }
    // public routes need no key
    expect((await server.app.inject({ method: 'GET', url: '/health' })).statusCode).toBe(200);
    expect((await server.app.inject({ method: 'GET', url: '/info' })).statusCode).toBe(200);
  });

  it('adapter_source=local is confined to the adapter directories (no .., no symlink escape)', async () => {
    const engine = new FakeEngine();
    server = testServer(engine);
    const root = server.context.options.adapterDirs[0]!;
    mkdirSync(path.join(root, 'mine'));
    const outside = mkdtempSync(path.join(tmpdir(), 'soppu-outside-'));
    symlinkSync(outside, path.join(root, 'escape'));
    const ask = (adapterId: string) =>
      server!.app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hi', parameters: { adapter_id: adapterId, adapter_source: 'local', max_new_tokens: 1 } } });
    expect((await ask('mine')).statusCode).toBe(200);
    expect(engine.lastRequest?.adapterPath).toBe(path.join(root, 'mine'));
    for (const bad of ['../', '../../etc', 'escape', outside, '/etc', 'mine/../..']) {
      const response = await ask(bad);
      expect(response.statusCode, bad).toBe(404);
    }
    // a folder that fails to load is named as the request named it, not where the server keeps it
    mkdirSync(path.join(root, 'mine', 'broken-1'));
    const failed = await ask('mine/broken-1');
    expect(failed.statusCode).toBe(424);
    expect(failed.json().error).toContain('could not be loaded from mine/broken-1: mine/broken-1/adapter_model.safetensors: header too long');
    expect(failed.body).not.toContain(root);
    expect(failed.body).not.toContain(realpathSync(root));
  });
});

describe('keys file reload (POST /keys/reload)', () => {
  it('an admin reloads keys.json: an added user reaches their adapters at once, a removed one gets 401; user keys get 403', async () => {
    const engine = new FakeEngine();
    engine.adapters.set('carol-1', { id: 'carol-1', source: 'bank', storage: 'compressed', tier: 'disk', pinned: false, bytes: 1, version: 0 });
    const file = path.join(mkdtempSync(path.join(tmpdir(), 'soppu-keys-')), 'keys.json');
    writeFileSync(file, JSON.stringify(keysJson()));
    server = testServer(engine, { accessControl: AccessControl.fromFile(file) });
    const generate = (key: string, adapterId: string) =>
      server!.app.inject({ method: 'POST', url: '/generate', headers: { authorization: `Bearer ${key}` }, payload: { inputs: 'hi', parameters: { adapter_id: adapterId, max_new_tokens: 1 } } });
    const reload = (key: string) => server!.app.inject({ method: 'POST', url: '/keys/reload', headers: { authorization: `Bearer ${key}` } });
    const carol = 'sk-carol-000000';
    expect((await generate(carol, 'carol-1')).statusCode).toBe(401);
    const { [KEYS.bob]: _removed, ...rest } = keysJson();
    writeFileSync(file, JSON.stringify({ ...rest, [carol]: { role: 'user', adapters: ['carol-*'] } }));
    expect((await generate(carol, 'carol-1')).statusCode).toBe(401); // not before the reload
    expect((await reload(KEYS.alice)).statusCode).toBe(403);
    const reloaded = await reload(KEYS.admin);
    expect(reloaded.statusCode).toBe(200);
    expect(reloaded.json()).toEqual({ keys: 3, warnings: [] });
    expect((await generate(carol, 'carol-1')).statusCode).toBe(200);
    expect((await generate(carol, 'alice-1')).statusCode).toBe(404);
    expect((await generate(KEYS.bob, 'bob-1')).statusCode).toBe(401);
    // a broken edit is a 422 naming the file; the keys loaded before stay
    writeFileSync(file, '{"sk-admin-000000": ');
    const failed = await reload(KEYS.admin);
    expect(failed.statusCode).toBe(422);
    expect(failed.json().error).toContain(`keys file ${file} is not valid JSON`);
    expect((await generate(carol, 'carol-1')).statusCode).toBe(200);
    expect((await reload(KEYS.admin)).statusCode).toBe(422);
    // a file missing mid-save (renamed over by an editor) is a 422 too, not a generation failure
    rmSync(file);
    const missing = await reload(KEYS.admin);
    expect(missing.statusCode).toBe(422);
    expect(missing.json().error).toContain(`keys file ${file} cannot be read`);
    expect((await generate(carol, 'carol-1')).statusCode).toBe(200);
  });

  it('without --auth there is no keys file: 422 naming the option', async () => {
    server = testServer(new FakeEngine());
    const response = await server.app.inject({ method: 'POST', url: '/keys/reload' });
    expect(response.statusCode).toBe(422);
    expect(response.json().error).toBe('Input validation error: the server runs without --auth: there is no keys file to reload');
  });
});

describe('local adapters and keys', () => {
  it("a user key reaches no other user's local folder by another name (.., a symlink): the same 404 as a missing one", async () => {
    const engine = new FakeEngine();
    server = testServer(engine, { auth: true });
    const root = server.context.options.adapterDirs[0]!;
    for (const name of ['alice-1', 'bob-1']) mkdirSync(path.join(root, name));
    symlinkSync(path.join(root, 'bob-1'), path.join(root, 'alice-link'));
    const ask = (adapterId: string, key: string) =>
      server!.app.inject({
        method: 'POST', url: '/generate', headers: { authorization: `Bearer ${key}` },
        payload: { inputs: 'hi', parameters: { adapter_id: adapterId, adapter_source: 'local', max_new_tokens: 1 } },
      });
    expect((await ask('alice-1', KEYS.alice)).statusCode).toBe(200);
    expect((await ask('bob-1', KEYS.bob)).statusCode).toBe(200);
    const missing = await ask('alice-x/../bob-nope', KEYS.alice);
    expect(missing.statusCode).toBe(404);
    for (const other of ['alice-x/../bob-1', 'alice-1/../bob-1', 'alice-link']) {
      const response = await ask(other, KEYS.alice);
      expect(response.statusCode, other).toBe(404);
      expect(response.json().error, other).toBe(missing.json().error.replace('alice-x/../bob-nope', other)); // no oracle
    }
    const openAi = await server.app.inject({
      method: 'POST', url: '/v1/chat/completions', headers: { authorization: `Bearer ${KEYS.alice}` },
      payload: { model: 'alice-x/../bob-1', adapter_source: 'local', messages: [{ role: 'user', content: 'hi' }], max_tokens: 1 },
    });
    expect(openAi.statusCode).toBe(404);
    // an adapters root itself (an operator may give one PEFT folder as a root): not by a user key's glob
    const rootRequests = ['alice-x/..', 'alice-1/..', `alice-x/../../${path.basename(root)}`];
    for (const name of rootRequests) {
      const response = await ask(name, KEYS.alice);
      expect(response.statusCode, name).toBe(404);
      expect(response.json().error, name).toBe(missing.json().error.replace('alice-x/../bob-nope', name));
    }
    expect((await ask('alice-x/..', KEYS.admin)).statusCode).toBe(200);
  });
});

describe('body limits', () => {
  it('an archive content type gets the server body limit on every route but the upload (which has its own)', async () => {
    const engine = new FakeEngine();
    server = testServer(engine, { maxBodyBytes: 1000, maxUploadBytes: 1 << 20 });
    const big = Buffer.alloc(20_000, 1);
    for (const type of ['application/octet-stream', 'application/gzip', 'application/x-tar']) {
      for (const url of ['/generate', '/v1/completions', '/tokenize']) {
        const response = await server.app.inject({ method: 'POST', url, payload: big, headers: { 'content-type': type } });
        expect(response.statusCode, `${type} ${url}`).toBe(413);
        expect(response.body, `${type} ${url}`).toMatch(/larger than the configured limit/);
      }
    }
    // the upload route reads archives up to maxUploadBytes (this one is 20 KB of zeros: not a tar, but read)
    const upload = await server.app.inject({ method: 'POST', url: '/adapters?id=a-1', payload: Buffer.alloc(20_000), headers: { 'content-type': 'application/x-tar' } });
    expect(upload.statusCode).toBe(422);
    expect(JSON.stringify(upload.json())).not.toMatch(/larger than the configured limit/);
  });
});

describe('adapter management', () => {
  it('an upload whose id is 256 characters long is stored (the folder takes the first 64)', async () => {
    const engine = new FakeEngine();
    server = testServer(engine, { auth: true });
    const id = `a${'b'.repeat(255)}`;
    const archive = gzipSync(tarOf({ 'x/adapter_config.json': '{"r": 4}', 'x/adapter_model.safetensors': 'x' }));
    const uploaded = await server.app.inject({ method: 'POST', url: `/adapters?id=${id}&compress=false`, payload: archive, headers: { authorization: `Bearer ${KEYS.admin}`, 'content-type': 'application/gzip' } });
    expect(uploaded.statusCode).toBe(201);
    expect(uploaded.json()).toMatchObject({ id });
  });

  it('uploads a tar.gz, hot-reloads under the same id, pins, lists and removes', async () => {
    const engine = new FakeEngine({ adapters: ['alice-1'] });
    server = testServer(engine, { auth: true });
    const admin = { authorization: `Bearer ${KEYS.admin}` };
    const archive = gzipSync(tarOf({ 'my-adapter/adapter_config.json': '{"r": 4}', 'my-adapter/adapter_model.safetensors': 'x' }));
    const uploaded = await server.app.inject({ method: 'POST', url: '/adapters?id=alice-9&compress=false', payload: archive, headers: { ...admin, 'content-type': 'application/gzip' } });
    expect(uploaded.statusCode).toBe(201);
    expect(uploaded.json()).toMatchObject({ id: 'alice-9', storage: 'raw', source: 'local' });
    const ask = () => server!.app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hi', parameters: { adapter_id: 'alice-9', max_new_tokens: 6 } }, headers: { authorization: `Bearer ${KEYS.alice}` } });
    const first = (await ask()).json().generated_text;
    expect(first).toBe(engine.expectedText('hi', 'alice-9', 6));
    // hot reload: the next request sees the new version
    // ignore_base_model reaches the engine (as bank add --ignore-base-model); anything but true/false is refused
    const vouched = await server.app.inject({ method: 'POST', url: '/adapters?id=alice-9&ignore_base_model=true', payload: tarOf({ 'adapter_config.json': '{}' }), headers: { ...admin, 'content-type': 'application/x-tar' } });
    expect(vouched.statusCode).toBe(201);
    expect(engine.lastRegisterOptions).toMatchObject({ compress: true, ignoreBaseModel: true });
    const maybe = await server.app.inject({ method: 'POST', url: '/adapters?id=alice-9&ignore_base_model=maybe', payload: tarOf({ 'adapter_config.json': '{}' }), headers: { ...admin, 'content-type': 'application/x-tar' } });
    expect(maybe.statusCode).toBe(422);
    expect(maybe.json().error).toBe("Input validation error: `ignore_base_model` must be true or false; got 'maybe'");
    const compressNo = await server.app.inject({ method: 'POST', url: '/adapters?id=alice-9&compress=no', payload: tarOf({ 'adapter_config.json': '{}' }), headers: { ...admin, 'content-type': 'application/x-tar' } });
    expect(compressNo.statusCode).toBe(422);
    expect(compressNo.json().error).toBe("Input validation error: `compress` must be true or false; got 'no'");
    // a misspelled query parameter is refused, not ignored (compres=false would have written into the bank)
    const typo = await server.app.inject({ method: 'POST', url: '/adapters?id=alice-9&compres=false', payload: tarOf({ 'adapter_config.json': '{}' }), headers: { ...admin, 'content-type': 'application/x-tar' } });
    expect(typo.statusCode).toBe(422);
    expect(typo.json().error).toContain('unknown query parameter `compres`');
    const again = await server.app.inject({ method: 'POST', url: '/adapters?id=alice-9', payload: tarOf({ 'adapter_config.json': '{}' }), headers: { ...admin, 'content-type': 'application/x-tar' } });
    expect(again.statusCode).toBe(201);
    const second = (await ask()).json().generated_text;
    expect(second).toBe(engine.expectedText('hi', 'alice-9', 6));
    expect(second).not.toBe(first);
    // register by path inside the adapter dirs
    const root = server.context.options.adapterDirs[0]!;
    mkdirSync(path.join(root, 'p1'));
    writeFileSync(path.join(root, 'p1', 'adapter_config.json'), '{}');
    const byPath = await server.app.inject({ method: 'POST', url: '/adapters', payload: { id: 'bob-1', path: 'p1' }, headers: admin });
    expect(byPath.statusCode).toBe(201);
    // an admin is told why a path is refused (a user never reaches this route)
    // a folder whose adapter is bad: 422 naming it, as for an upload (it was a 424 "Request failed during generation")
    mkdirSync(path.join(root, 'p2'));
    const bad = await server.app.inject({ method: 'POST', url: '/adapters', payload: { id: 'bob-3', path: 'p2' }, headers: admin });
    expect(bad.statusCode).toBe(422);
    expect(bad.json().error).toMatch(/^Input validation error: the adapter at `path`: .*adapter_config\.json is missing/);
    const escape = await server.app.inject({ method: 'POST', url: '/adapters', payload: { id: 'bob-2', path: '/etc' }, headers: admin });
    expect(escape.statusCode).toBe(422);
    expect(escape.json().error).toContain('`path` "/etc" is not a folder inside the --adapters directories');
    const noDirs = testServer(new FakeEngine(), { adapterDirs: [] });
    const refused = await noDirs.app.inject({ method: 'POST', url: '/adapters', payload: { id: 'bob-2', path: 'p1' } });
    expect(refused.statusCode).toBe(422);
    expect(refused.json().error).toContain('`path` needs the server started with --adapters DIR');
    await noDirs.app.close();
    // a JSON registration takes its fields from the body only: a compress=false in the query was dropped
    const queried = await server.app.inject({ method: 'POST', url: '/adapters?compress=false', payload: { id: 'bob-1', path: 'p1' }, headers: admin });
    expect(queried.statusCode).toBe(422);
    expect(queried.json().error).toContain('query parameter `compress` on a JSON registration');
    const vouchedByPath = await server.app.inject({ method: 'POST', url: '/adapters', payload: { id: 'bob-1', path: 'p1', ignore_base_model: true }, headers: admin });
    expect(vouchedByPath.statusCode).toBe(201);
    expect(engine.lastRegisterOptions).toMatchObject({ ignoreBaseModel: true });
    for (const field of ['compress', 'ignore_base_model']) {
      const notBoolean = await server.app.inject({ method: 'POST', url: '/adapters', payload: { id: 'bob-1', path: 'p1', [field]: 'yes' }, headers: admin });
      expect(notBoolean.statusCode).toBe(422);
      expect(notBoolean.json().error).toBe(`Input validation error: \`${field}\` must be a boolean`);
    }
    const unknownField = await server.app.inject({ method: 'POST', url: '/adapters', payload: { id: 'bob-2', path: 'p1', extra: 1 }, headers: admin });
    expect(unknownField.statusCode).toBe(422);
    const missingConfig = await server.app.inject({ method: 'POST', url: '/adapters?id=x1', payload: tarOf({ 'weights.bin': 'x' }), headers: { ...admin, 'content-type': 'application/x-tar' } });
    expect(missingConfig.statusCode).toBe(422);
    expect(missingConfig.json().error).toContain('adapter_config.json');
    // pin / unpin / list / remove
    expect((await server.app.inject({ method: 'POST', url: '/adapters/pin', payload: { id: 'alice-9' }, headers: admin })).json()).toMatchObject({ pinned: true, tier: 'resident' });
    expect((await server.app.inject({ method: 'POST', url: '/adapters/unpin', payload: { id: 'alice-9' }, headers: admin })).json()).toMatchObject({ pinned: false });
    expect((await server.app.inject({ method: 'POST', url: '/adapters/pin', payload: { id: 'nope' }, headers: admin })).statusCode).toBe(404);
    const list = (await server.app.inject({ method: 'GET', url: '/adapters', headers: admin })).json().adapters;
    expect(list.map((a: { id: string }) => a.id).sort()).toEqual(['alice-1', 'alice-9', 'bob-1']);
    expect(list[0]).toHaveProperty('size_bytes');
    expect((await server.app.inject({ method: 'DELETE', url: '/adapters/alice-9', headers: admin })).statusCode).toBe(204);
    expect((await ask()).statusCode).toBe(404);
    expect((await server.app.inject({ method: 'DELETE', url: '/adapters/alice-9', headers: admin })).statusCode).toBe(404);
  });

  it('an upload whose file is also another entry\'s folder is a 422 naming it, and leaves nothing behind', async () => {
    const engine = new FakeEngine();
    server = testServer(engine, { auth: true });
    const admin = { authorization: `Bearer ${KEYS.admin}`, 'content-type': 'application/x-tar' };
    // both orders: the folder's entry before the file, and after it
    const clashes: Record<string, string>[] = [{ a: 'x', 'a/adapter_config.json': '{}' }, { 'a/adapter_config.json': '{}', a: 'x' }, { 'w/a': 'x', 'w/a/b/adapter_config.json': '{}' }];
    for (const files of clashes) {
      const response = await server.app.inject({ method: 'POST', url: '/adapters?id=clash-1', payload: tarOf(files), headers: admin });
      const [folder, file] = Object.keys(files).sort();
      expect(response.statusCode, folder).toBe(422);
      expect(response.json()).toEqual({
        error: `Input validation error: upload for 'clash-1': entry '${folder}' is a file but also the folder of entry '${file}'`,
        error_type: 'validation',
      });
    }
    expect(engine.hasAdapter('clash-1')).toBe(false);
    expect((await server.app.inject({ method: 'GET', url: '/adapters', headers: admin })).json().adapters).toEqual([]);
    expect(readdirSync(server.context.options.uploadDir)).toEqual([]);
  });

  it('an upload entry with a control character in its name is a 422, not a 424 naming a server path', async () => {
    const engine = new FakeEngine();
    server = testServer(engine, { auth: true });
    const admin = { authorization: `Bearer ${KEYS.admin}`, 'content-type': 'application/x-tar' };
    const response = await server.app.inject({ method: 'POST', url: '/adapters?id=ctl-1', payload: tarOf({ 'evil\u0001name/adapter_config.json': '{}' }), headers: admin });
    expect(response.statusCode).toBe(422);
    expect(response.json().error).toMatch(/control character in its name/);
    expect(response.json().error).not.toContain(server.context.options.uploadDir);
    const uploads = server.context.options.uploadDir;
    expect(existsSync(uploads) ? readdirSync(uploads) : []).toEqual([]);
  });

  it('bounds how long a client may take to send its request', () => {
    server = testServer(new FakeEngine());
    // the listener's own limit (Node's http server): a body trickled in forever is cut off
    expect(server.app.server.requestTimeout).toBeGreaterThan(0);
    expect(server.app.server.requestTimeout).toBeLessThanOrEqual(120_000);
  });

  it('a write the filesystem refuses is an error naming the entry, not a bare errno', () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'soppu-write-'));
    const long = `${'n'.repeat(300)}/adapter_config.json`;
    expect(() => writeAdapterFiles([{ name: long, data: new Uint8Array() }], dir)).toThrow(`Input validation error: upload: cannot write entry '${long}': ENAMETOOLONG`);
  });

  it('the tar reader refuses links, escaping paths and bad checksums', () => {
    const limits = { maxEntries: 16, maxTotalBytes: 1 << 20 };
    expect(() => parseTar(tarOf({ '../evil': 'x' }), limits)).toThrow(/escaping path/);
    expect(() => parseTar(tarOf({ '/abs': 'x' }), limits)).toThrow(/escaping path/);
    expect(() => parseTar(tarOf({}, [{ type: '2', name: 'link' }]), limits)).toThrow(/not a regular file/);
    const corrupt = tarOf({ 'a.json': '{}' });
    corrupt[10] = 65;
    expect(() => parseTar(corrupt, limits)).toThrow(/checksum/);
    expect(() => parseTar(tarOf({ a: 'x'.repeat(100) }), { maxEntries: 16, maxTotalBytes: 10 })).toThrow(/exceeds 10 bytes/);
    expect(parseTar(tarOf({ './dir/a.json': '{}' }), limits).map((f) => f.name)).toEqual(['dir/a.json']);
  });
});

describe('load', () => {
  it('past max_concurrent_requests → 429 with a clear message; admitted ones complete', async () => {
    const engine = new FakeEngine({ tokenDelayMs: 20 });
    server = testServer(engine, { maxConcurrentRequests: 4 });
    const responses = await Promise.all(
      Array.from({ length: 10 }, () => server!.app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hi', parameters: { max_new_tokens: 5 } } })),
    );
    const codes = responses.map((r) => r.statusCode).sort();
    expect(codes.filter((c) => c === 200)).toHaveLength(4);
    expect(codes.filter((c) => c === 429)).toHaveLength(6);
    const overloaded = responses.find((r) => r.statusCode === 429)!.json();
    expect(overloaded).toEqual({ error: 'Model is overloaded: 4 requests are already in flight (max_concurrent_requests)', error_type: 'overloaded' });
    expect(server.context.service.running).toBe(0);
  });

  it('draining: adapter changes are 503; one begun before the drain does not hold it past its deadline', async () => {
    server = testServer(new FakeEngine({ adapters: ['x'] }));
    server.context.service.startDraining();
    for (const [method, url, payload] of [['POST', '/adapters/pin', { id: 'x' }], ['POST', '/bank/reload', undefined], ['DELETE', '/adapters/x', undefined]] as const) {
      const refused = await server.app.inject({ method, url, ...(payload ? { payload } : {}) });
      expect(refused.statusCode, `${method} ${url}`).toBe(503);
      expect(refused.json().error_type, `${method} ${url}`).toBe('unhealthy');
    }
    await server.app.close();

    server = testServer(new FakeEngine({ registerDelayMs: 600 }), { drainDeadlineMs: 200 });
    await server.app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = server.app.server.address() as { port: number };
    const upload = fetch(`http://127.0.0.1:${port}/adapters?id=slow-1`, { method: 'POST', headers: { 'content-type': 'application/x-tar' }, body: tarOf({ 'adapter_config.json': '{}' }) })
      .then((r) => r.status, () => 'closed');
    await new Promise((r) => setTimeout(r, 100));
    const started = Date.now();
    await server.drain();
    expect(Date.now() - started).toBeLessThan(3000); // was the 72 s keep-alive of the upload's connection
    expect([201, 'closed']).toContain(await upload);
    server = null;
  });

  it('draining: new requests 503, /health 503, running ones finish', async () => {
    const engine = new FakeEngine({ tokenDelayMs: 10 });
    server = testServer(engine);
    const running = server.app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hi', parameters: { max_new_tokens: 10 } } });
    while (engine.running === 0) await new Promise((r) => setTimeout(r, 5));
    server.context.service.startDraining();
    const refused = await server.app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hi', parameters: { max_new_tokens: 1 } } });
    expect(refused.statusCode).toBe(503);
    expect((await server.app.inject({ method: 'GET', url: '/health' })).statusCode).toBe(503);
    expect((await running).statusCode).toBe(200);
  });
});
