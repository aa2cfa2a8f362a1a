// End-to-end tests of the web client in headless Chromium, against real gateway nodes.
// deploy/check-web.sh starts the stack and passes it in the environment:
//   WEB_GATEWAY_A, WEB_GATEWAY_B   base URLs of two running gateway nodes (node ids WEB_NODE_A/B)
//   WEB_GATEWAY_BIN                the gateway binary; the reconnect test runs a third node with it
//   WEB_RESTART_PORT, WEB_RESTART_ADMIN_PORT   that node's public and admin ports
//   WEB_RESTART_PID_FILE           where its pids are written, one a line, for the script's cleanup
//   WEB_RESET_WEBHOOK_PORT         the port on 127.0.0.1 the gateways post password reset notices
//                                  to (CHAT_PASSWORD_RESET_WEBHOOK_URL); the reset test listens there
//   CHAT_*                         the stack's settings (Redis, database, prefix, JWT secret)
//   WEB_SERVE_FROM_TREE=1          serve web/ from the test's front even if the gateway serves it
// Screenshots go to web/tests/artifacts/.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdir, readFile } from 'node:fs/promises';
import { appendFileSync, openSync, readFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run these tests with deploy/check-web.sh`);
  return v;
};
const GW_A = env('WEB_GATEWAY_A');
const GW_B = env('WEB_GATEWAY_B');
const NODE_A = process.env.WEB_NODE_A || null;
const NODE_B = process.env.WEB_NODE_B || null;
const WEB_DIR = new URL('../', import.meta.url);
const ARTIFACTS = new URL('./artifacts/', import.meta.url);
const RUN = `${Date.now().toString(36)}${process.pid}`;
const PASSWORD = 'correct horse battery';
const WAIT = { timeout: 15000 };

const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

// Every file the gateway embeds, read from its one asset table (gateway/src/web_client.rs), so
// this list cannot drift from it. When the gateway under test does not serve them (or serves
// other copies), the tests put a small server on 127.0.0.1 in front of it that serves them from
// web/ with the gateway's Content-Security-Policy and passes every other request, WebSocket
// upgrades included, through to the gateway unchanged: the page then runs as if the gateway
// served it.
const TYPES = { html: 'text/html; charset=utf-8', css: 'text/css; charset=utf-8', js: 'text/javascript; charset=utf-8' };
const ASSETS = Object.fromEntries(
  [...readFileSync(new URL('../../gateway/src/web_client.rs', import.meta.url), 'utf8').matchAll(/asset!\("([^"]+)"\)/g)]
    .map(([, file]) => [`/${file}`, [file, TYPES[file.split('.').pop()]]]));
ASSETS['/'] = ['index.html', TYPES.html];
const CSP = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data: https:; style-src 'self' 'unsafe-inline'; " +
  "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

let browser;
let servedByGateway = false;
const pageErrors = [];
const fronts = new Map(); // gateway URL -> {server, url}

before(async () => {
  await mkdir(ARTIFACTS, { recursive: true });
  servedByGateway = process.env.WEB_SERVE_FROM_TREE !== '1' && (await gatewayServesTree(GW_A));
  const why = process.env.WEB_SERVE_FROM_TREE === '1' ? 'WEB_SERVE_FROM_TREE=1' : 'this gateway binary does not serve / or embeds other copies of web/';
  console.log(`# page served by ${servedByGateway ? 'the gateway' : `a test server in front of the gateway (${why})`}`);
  browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: CHROMIUM_ARGS });
});

after(async () => {
  await browser?.close();
  for (const { server } of fronts.values()) {
    server.closeAllConnections();
    server.close();
  }
});

/** Whether the gateway serves the four files exactly as they are in web/ (it embeds them when
 *  it is compiled, so an older binary serves older copies, or none). */
async function gatewayServesTree(gateway) {
  for (const [path, [file]] of Object.entries(ASSETS)) {
    const res = await fetch(`${gateway}${path}`);
    if (!res.ok || (await res.text()) !== (await readFile(new URL(file, WEB_DIR), 'utf8'))) return false;
  }
  return true;
}

/** Where the page for `gateway` is loaded from: the gateway itself, or a front for it. */
async function pageOrigin(gateway) {
  if (servedByGateway) return gateway;
  if (fronts.has(gateway)) return fronts.get(gateway).url;
  const upstream = new URL(gateway);
  const target = { host: upstream.hostname, port: Number(upstream.port) };
  const server = http.createServer(async (req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    if (req.method === 'GET' && path in ASSETS) {
      const [file, type] = ASSETS[path];
      res.writeHead(200, { 'content-type': type, 'content-security-policy': CSP, 'cache-control': 'no-cache', 'referrer-policy': 'no-referrer' });
      res.end(await readFile(new URL(file, WEB_DIR)));
      return;
    }
    const proxied = http.request({ ...target, method: req.method, path: req.url, headers: req.headers }, (up) => {
      res.writeHead(up.statusCode, up.headers);
      up.pipe(res);
    });
    proxied.on('error', () => res.destroy());
    req.pipe(proxied);
  });
  server.on('upgrade', (req, socket, head) => {
    const up = net.connect(target, () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      up.write(`${lines.join('\r\n')}\r\n\r\n`);
      if (head.length) up.write(head);
      up.pipe(socket);
      socket.pipe(up);
    });
    up.on('error', () => socket.destroy());
    socket.on('error', () => up.destroy());
    up.on('close', () => socket.destroy());
    socket.on('close', () => up.destroy());
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${server.address().port}`;
  fronts.set(gateway, { server, url });
  return url;
}

/** A browser context: one person's browser. */
async function newBrowser(options = {}) {
  return browser.newContext(options);
}

async function openPage(context, gateway, label) {
  const page = await context.newPage();
  page.on('pageerror', (err) => pageErrors.push(`${label}: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error' && /Content Security Policy/.test(msg.text())) pageErrors.push(`${label}: ${msg.text()}`);
  });
  await page.goto(`${await pageOrigin(gateway)}/`);
  return page;
}

async function shot(page, name) {
  await page.screenshot({ path: new URL(`${name}.png`, ARTIFACTS).pathname, fullPage: true });
}

function email(name) {
  return `${name.split(' ')[0].toLowerCase()}-${RUN}@example.com`;
}

async function register(page, name, { remember = false } = {}) {
  await page.getByRole('link', { name: 'Sign up' }).click();
  const form = page.locator('#register-form');
  await form.getByLabel('Name', { exact: true }).fill(name);
  await form.getByLabel('Email', { exact: true }).fill(email(name));
  await form.getByLabel('Password', { exact: true }).fill(PASSWORD);
  await form.getByLabel('Confirm password').fill(PASSWORD);
  if (remember) await form.getByLabel('Remember me').check();
  await form.getByRole('button', { name: 'Register' }).click();
  await connected(page);
}

async function login(page, name, { remember = false } = {}) {
  const form = page.locator('#login-form');
  await form.getByLabel('Email', { exact: true }).fill(email(name));
  await form.getByLabel('Password', { exact: true }).fill(PASSWORD);
  if (remember) await form.getByLabel('Remember me').check();
  await form.getByRole('button', { name: 'Log in' }).click();
  await connected(page);
}

async function connected(page, node = null) {
  await page.locator('#conn[data-state="online"]').waitFor(WAIT);
  if (node) assert.equal(await page.locator('#conn').getAttribute('data-node'), node);
}

function person(page, name) {
  return page.locator('#people-list button.person', { hasText: name });
}

function conversation(page, title) {
  return page.locator('#conversation-list button.conv', { has: page.locator('.item-title', { hasText: title }) });
}

async function showPeople(page) {
  await page.getByRole('tab', { name: 'People' }).click();
}

async function showChats(page) {
  await page.getByRole('tab', { name: /^Chats/ }).click();
}

async function send(page, text) {
  await page.getByLabel('Message', { exact: true }).fill(text);
  await page.getByLabel('Message', { exact: true }).press('Enter');
  await page.locator('#message-list li.msg.own .body', { hasText: text }).last().waitFor(WAIT);
}

/** The messages shown in the open conversation, in DOM order. */
function shownMessages(page) {
  return page.$$eval('#message-list li.msg', (items) =>
    items.map((li) => ({ seq: Number(li.dataset.seq), body: li.querySelector('.body').textContent })),
  );
}

async function waitForMessage(page, text) {
  await page.locator('#message-list li.msg .body', { hasText: text }).first().waitFor(WAIT);
}

function assertNoPageErrors() {
  assert.deepEqual(pageErrors, [], 'the pages raised errors');
}

describe('two people on two gateway nodes', () => {
  test('register, presence, direct chat, typing, receipts, reload, rooms, going offline', async () => {
    const alice = { name: `Alice ${RUN}` };
    const bob = { name: `Bob ${RUN}` };
    alice.context = await newBrowser();
    bob.context = await newBrowser();
    alice.page = await openPage(alice.context, GW_A, 'alice');
    bob.page = await openPage(bob.context, GW_B, 'bob');
    const A = alice.page;
    const B = bob.page;

    // The log-in, sign-up and forgot-password pages.
    await A.getByRole('heading', { name: 'Log in' }).waitFor(WAIT);
    await shot(A, 'login');
    await A.getByRole('link', { name: 'Forgot password?' }).click();
    await A.getByRole('heading', { name: 'Forgot password' }).waitFor(WAIT);
    await A.getByRole('button', { name: 'Send reset link' }).waitFor(WAIT);
    await shot(A, 'forgot-password');
    await A.getByRole('link', { name: 'Back to log in' }).click();

    // Registration checks fields in the page and reports the server's verdict in words.
    await A.getByRole('link', { name: 'Sign up' }).click();
    const form = A.locator('#register-form');
    await form.getByLabel('Name', { exact: true }).fill(alice.name);
    await form.getByLabel('Email', { exact: true }).fill('not-an-email');
    await form.getByLabel('Password', { exact: true }).fill('short');
    await form.getByLabel('Confirm password').fill('different');
    await form.getByRole('button', { name: 'Register' }).click();
    await form.getByText('The two passwords do not match.').waitFor(WAIT);
    await form.getByText('Use at least 8 characters.').waitFor(WAIT);
    await form.getByLabel('Password', { exact: true }).fill(PASSWORD);
    await form.getByLabel('Confirm password').fill(PASSWORD);
    await form.getByRole('button', { name: 'Register' }).click();
    await form.getByText('Please enter a valid email address').waitFor(WAIT);
    await shot(A, 'register-errors');
    await A.getByRole('link', { name: 'Log in' }).click();

    // Alice registers on node A, Bob on node B.
    await register(A, alice.name);
    await connected(A, NODE_A);
    await register(B, bob.name);
    await connected(B, NODE_B);
    assert.notEqual(await A.locator('#conn').getAttribute('data-node'), await B.locator('#conn').getAttribute('data-node'));
    // Without "remember me" the token lives only as long as the tab.
    assert.equal(await A.evaluate(() => localStorage.getItem('chat.session')), null);
    assert.ok(await A.evaluate(() => sessionStorage.getItem('chat.session')));

    // Each sees the other online.
    await showPeople(B);
    await person(B, alice.name).locator('.presence', { hasText: 'Online' }).waitFor(WAIT);
    await showPeople(A);
    await A.getByRole('button', { name: 'Refresh' }).click();
    await person(A, bob.name).locator('.presence', { hasText: 'Online' }).waitFor(WAIT);
    await shot(A, 'people');

    // Bob logs out: Alice sees him go offline, live. He logs in again, remembered: online again.
    await B.getByRole('button', { name: 'Log out' }).click();
    await B.getByRole('heading', { name: 'Log in' }).waitFor(WAIT);
    await person(A, bob.name).locator('.presence', { hasText: 'Offline, last seen just now' }).waitFor(WAIT);
    await B.locator('#login-form').getByLabel('Email', { exact: true }).fill(email(bob.name));
    await B.locator('#login-form').getByLabel('Password', { exact: true }).fill('wrong password');
    await B.locator('#login-form').getByRole('button', { name: 'Log in' }).click();
    await B.getByText('That email and password do not match an account.').waitFor(WAIT);
    await login(B, bob.name, { remember: true });
    assert.ok(await B.evaluate(() => localStorage.getItem('chat.session')));
    await person(A, bob.name).locator('.presence', { hasText: 'Online' }).waitFor(WAIT);

    // Alice starts a direct conversation from the People list.
    await person(A, bob.name).click();
    await A.getByRole('heading', { name: bob.name }).waitFor(WAIT);
    await send(A, 'Hello Bob!');

    // Bob gets it with an unread count, opens it; Alice sees "Seen".
    await showChats(B);
    const bobsConv = conversation(B, alice.name);
    await bobsConv.locator('.badge', { hasText: '1' }).waitFor(WAIT);
    await bobsConv.click();
    await waitForMessage(B, 'Hello Bob!');
    await A.locator('#message-list li.msg.own .receipt', { hasText: 'Seen' }).waitFor(WAIT);
    assert.equal(await bobsConv.locator('.badge').count(), 0);

    // Bob types: Alice sees it. Then they chat both ways.
    await B.getByLabel('Message', { exact: true }).fill('Hi Al');
    await A.getByText(`${bob.name} is typing…`).waitFor(WAIT);
    await B.getByLabel('Message', { exact: true }).press('Enter');
    await waitForMessage(A, 'Hi Al');
    await send(A, 'How are you?');
    await waitForMessage(B, 'How are you?');
    await send(B, 'Fine, <b>thanks</b> & you?');
    await waitForMessage(A, 'Fine, <b>thanks</b> & you?');
    assert.equal(await A.locator('#message-list b').count(), 0, 'message text must not become markup');
    await B.locator('#message-list li.msg.own .receipt', { hasText: 'Seen' }).waitFor(WAIT);
    const expected = ['Hello Bob!', 'Hi Al', 'How are you?', 'Fine, <b>thanks</b> & you?'];
    assert.deepEqual((await shownMessages(A)).map((m) => m.body), expected);
    assert.deepEqual((await shownMessages(B)).map((m) => m.body), expected);
    assert.deepEqual((await shownMessages(B)).map((m) => m.seq), [1, 2, 3, 4]);
    await shot(A, 'chat-alice');
    await shot(B, 'chat-bob');

    // Alice reloads: still logged in (same tab), and the whole history is there.
    await A.reload();
    await connected(A);
    await conversation(A, bob.name).click();
    await waitForMessage(A, 'Fine, <b>thanks</b> & you?');
    assert.deepEqual((await shownMessages(A)).map((m) => m.body), expected);
    // Bob's remembered session survives a reload as well.
    await B.reload();
    await connected(B);

    // Rooms: Alice creates one, adds Bob; they talk; Bob leaves.
    const room = `Team ${RUN}`;
    await showChats(A);
    await A.getByRole('button', { name: 'New room' }).click();
    await A.getByLabel('Room name').fill(room);
    await A.getByRole('button', { name: 'Create room' }).click();
    await A.getByRole('heading', { name: room }).waitFor(WAIT);
    await A.getByText('1 member: you').waitFor(WAIT);
    await A.getByRole('button', { name: 'Add people' }).click();
    await A.getByRole('dialog').getByLabel(bob.name).check();
    await A.getByRole('button', { name: 'Add', exact: true }).click();
    await A.getByText(`${bob.name} was added by you.`).waitFor(WAIT);
    await showChats(B);
    await conversation(B, room).click();
    await B.getByRole('heading', { name: room }).waitFor(WAIT);
    await send(B, 'Hello room');
    await waitForMessage(A, 'Hello room');
    await send(A, 'Welcome, Bob');
    await waitForMessage(B, 'Welcome, Bob');
    await B.locator('#message-list li.msg.own .receipt', { hasText: `Seen by ${alice.name}` }).waitFor(WAIT);
    await shot(A, 'room');

    // Roles: Bob, a plain member, sees Alice as the owner and may neither add nor remove.
    await B.getByText(/^2 members/).waitFor(WAIT);
    assert.equal(await B.getByRole('button', { name: 'Add people' }).isVisible(), false);
    await B.getByRole('button', { name: 'Members' }).click();
    const bobsList = B.locator('#members-list');
    await bobsList.locator('li', { hasText: alice.name }).getByText('Owner').waitFor(WAIT);
    await bobsList.locator('li', { hasText: `${bob.name} (you)` }).getByText('Member').waitFor(WAIT);
    assert.equal(await bobsList.getByRole('button').count(), 0);
    await B.getByRole('button', { name: 'Close' }).click();
    // Alice, the owner, may remove Bob or make him an admin; she does, and Bob may add people.
    await A.getByRole('button', { name: 'Members' }).click();
    await A.getByRole('button', { name: `Remove ${bob.name}` }).waitFor(WAIT);
    await A.getByRole('button', { name: `Make ${bob.name} an admin` }).click();
    await A.locator('#members-list li', { hasText: bob.name }).getByText('Admin').waitFor(WAIT);
    await shot(A, 'room-members');
    await A.getByRole('button', { name: 'Close' }).click();
    await B.getByText('You are now an admin.').waitFor(WAIT);
    await B.getByRole('button', { name: 'Add people' }).waitFor(WAIT);

    // Bob leaves, refusing the room: Alice cannot add him back until he allows it again.
    await B.getByRole('button', { name: 'Leave room' }).click();
    await B.getByLabel("Don't let anyone add me to this room again").check();
    await B.getByRole('button', { name: 'Leave', exact: true }).click();
    await B.getByText(`You left ${room}.`).waitFor(WAIT);
    assert.equal(await conversation(B, room).count(), 0);
    await A.getByText(`${bob.name} left.`).waitFor(WAIT);
    await A.getByRole('button', { name: 'Add people' }).click();
    await A.getByRole('dialog').getByLabel(bob.name).check();
    await A.getByRole('button', { name: 'Add', exact: true }).click();
    await A.getByText('does not want to be added').waitFor(WAIT);
    await A.getByRole('button', { name: 'Cancel' }).click();
    await B.getByRole('button', { name: 'Profile' }).click();
    await B.getByRole('button', { name: `Allow Room ${room}` }).click();
    await B.locator('#profile-blocks').waitFor({ state: 'hidden', ...WAIT });
    await B.getByRole('button', { name: 'Close' }).click();

    // Profile: the name and picture are editable (the profile test below edits them).
    await A.getByRole('button', { name: 'Profile' }).click();
    const profile = A.getByRole('dialog', { name: 'Profile' });
    assert.equal(await profile.getByLabel('Name', { exact: true }).inputValue(), alice.name);
    assert.equal(await profile.getByLabel('Avatar URL').inputValue(), '');
    await profile.getByText(email(alice.name)).waitFor(WAIT);
    await shot(A, 'profile');
    await profile.getByRole('button', { name: 'Close' }).click();

    // Bob closes his browser: Alice sees him go offline.
    await bob.context.close();
    await showPeople(A);
    await person(A, bob.name).locator('.presence', { hasText: 'Offline' }).waitFor({ timeout: 30000 });
    await shot(A, 'people-bob-offline');
    await alice.context.close();
    assertNoPageErrors();
  });

  test('a phone-sized screen shows one pane at a time', async () => {
    const context = await newBrowser({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
    const page = await openPage(context, GW_A, 'phone');
    const name = `Phoebe ${RUN}`;
    await register(page, name);
    await shot(page, 'phone-lists');
    await page.getByRole('button', { name: 'New room' }).click();
    await page.getByLabel('Room name').fill(`Phone room ${RUN}`);
    await page.getByRole('button', { name: 'Create room' }).click();
    await send(page, 'Typed on a phone');
    assert.equal(await page.locator('nav.sidebar').isVisible(), false);
    await shot(page, 'phone-chat');
    await page.getByRole('button', { name: 'Back to the lists' }).click();
    assert.equal(await page.locator('nav.sidebar').isVisible(), true);
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 390, `the page scrolls sideways (${width}px wide)`);
    await context.close();
    assertNoPageErrors();
  });
});

// Pictures for the profile test: https URLs on 127.0.0.1 port 1, answered inside the browser
// (context.route) so that nothing leaves the machine; nothing listens on that port either.
const AVATAR_OK = 'https://127.0.0.1:1/avatars/picture.svg';
const AVATAR_BROKEN = 'https://127.0.0.1:1/avatars/missing.png';
const AVATAR_SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">' +
  '<rect width="64" height="64" fill="#1f6f4a"/><circle cx="32" cy="25" r="12" fill="#fff"/>' +
  '<rect x="12" y="42" width="40" height="26" rx="13" fill="#fff"/></svg>';

/** A browser whose https requests (pictures) are answered by the test, never by the network. */
async function browserWithPictures() {
  const context = await newBrowser();
  await context.route((url) => url.protocol === 'https:', (route) => {
    if (route.request().url() === AVATAR_OK) {
      return route.fulfill({ status: 200, contentType: 'image/svg+xml', body: AVATAR_SVG });
    }
    return route.fulfill({ status: 404, contentType: 'text/plain', body: 'no such picture' });
  });
  return context;
}

describe('profile', () => {
  test('name and picture: checked like the server, saved, back after a reload, the new name seen by others', async () => {
    const hana = { name: `Hana ${RUN}`, newName: `Hanako ${RUN} Mori` };
    const ian = { name: `Ian ${RUN}` };
    hana.context = await browserWithPictures();
    ian.context = await browserWithPictures();
    const H = (hana.page = await openPage(hana.context, GW_A, 'hana'));
    const I = (ian.page = await openPage(ian.context, GW_B, 'ian'));
    await register(H, hana.name);
    await register(I, ian.name);
    // Ian writes to Hana, so each has the other in Chats too.
    await showPeople(I);
    await I.getByRole('button', { name: 'Refresh' }).click();
    await person(I, hana.name).click();
    await send(I, 'Hello Hana');
    await showChats(H);
    await conversation(H, ian.name).waitFor(WAIT);
    // Without a picture the avatars are initials.
    assert.equal(await H.locator('#me-avatar').textContent(), 'H' + RUN[0].toUpperCase());
    assert.equal(await H.locator('#me-avatar img').count(), 0);

    // The page checks the fields as the server does, and says what is wrong in words.
    await H.getByRole('button', { name: 'Profile' }).click();
    const dialog = H.getByRole('dialog', { name: 'Profile' });
    const nameField = dialog.getByLabel('Name', { exact: true });
    const urlField = dialog.getByLabel('Avatar URL');
    assert.equal(await nameField.inputValue(), hana.name);
    await nameField.fill('   ');
    await urlField.fill('http://127.0.0.1:1/me.png');
    await dialog.getByRole('button', { name: 'Save' }).click();
    await dialog.getByText('Please enter a name.').waitFor(WAIT);
    await dialog.getByText('Use an address that starts with https://. Pictures over plain http:// are not allowed.').waitFor(WAIT);
    assert.equal(await nameField.getAttribute('aria-invalid'), 'true');
    await shot(H, 'profile-errors');
    await nameField.fill('Hana\tMori'); // a control character (the field stops at 100 characters)
    await urlField.fill('https://me@127.0.0.1:1/me.png');
    await dialog.getByRole('button', { name: 'Save' }).click();
    await dialog.getByText('Use at most 100 characters, and no control characters.').waitFor(WAIT);
    await dialog.getByText('Use an address without a user name or @ before the site name.').waitFor(WAIT);
    await urlField.fill('https://127.0.0.1:1/my picture.png');
    await dialog.getByRole('button', { name: 'Save' }).click();
    await dialog.getByText('A web address cannot contain spaces or line breaks.').waitFor(WAIT);

    // A picture that cannot be loaded: saved, but the initials show.
    await nameField.fill(hana.newName);
    await urlField.fill(AVATAR_BROKEN);
    await dialog.getByRole('button', { name: 'Save' }).click();
    await H.getByText('Your profile was saved.').waitFor(WAIT);
    assert.equal(await dialog.isVisible(), false);
    await H.locator('#me-name', { hasText: hana.newName }).waitFor(WAIT);
    await H.locator('#me-avatar[data-avatar="failed"]').waitFor(WAIT);
    assert.equal(await H.locator('#me-avatar img').count(), 0);
    assert.equal(await H.locator('#me-avatar').textContent(), 'HM');

    // A picture that loads: shown instead of the initials, in the top bar and the profile.
    await H.getByRole('button', { name: 'Profile' }).click();
    assert.equal(await nameField.inputValue(), hana.newName);
    assert.equal(await urlField.inputValue(), AVATAR_BROKEN);
    await urlField.fill(AVATAR_OK);
    await urlField.press('Tab'); // (a change previews the picture)
    await H.locator('#profile-avatar[data-avatar="loaded"]').waitFor(WAIT);
    await shot(H, 'profile-edit');
    await dialog.getByRole('button', { name: 'Save' }).click();
    await H.locator('#me-avatar[data-avatar="loaded"]').waitFor(WAIT);
    assert.ok(await H.locator('#me-avatar img').evaluate((img) => img.naturalWidth > 0 && img.getAttribute('src')));
    await shot(H, 'profile-saved');

    // The server has both: after a reload they come from GET /users/me.
    const me = await H.evaluate(async () => {
      const { token } = JSON.parse(sessionStorage.getItem('chat.session'));
      return (await fetch('/api/v1/users/me', { headers: { Authorization: `Bearer ${token}` } })).json();
    });
    assert.equal(me.name, hana.newName);
    assert.equal(me.avatar_url, AVATAR_OK);
    await H.evaluate(() => {
      const s = JSON.parse(sessionStorage.getItem('chat.session'));
      sessionStorage.setItem('chat.session', JSON.stringify({ ...s, user: { id: s.user.id, name: 'stale copy' } }));
    });
    await H.reload();
    await connected(H);
    await H.locator('#me-name', { hasText: hana.newName }).waitFor(WAIT);
    await H.locator('#me-avatar[data-avatar="loaded"]').waitFor(WAIT);

    // Ian reloads: the new name in his Chats and People lists and in the conversation.
    // (The users and conversations lists carry names only, no avatar_url, so others see
    // initials: the page shows a picture wherever the API gives one.)
    await I.reload();
    await connected(I);
    await showChats(I);
    await conversation(I, hana.newName).click();
    await I.getByRole('heading', { name: hana.newName }).waitFor(WAIT);
    await showPeople(I);
    await person(I, hana.newName).waitFor(WAIT);
    assert.equal(await person(I, hana.name).count(), 0);
    await shot(I, 'profile-seen-by-others');

    // Removing the picture brings the initials back.
    await H.getByRole('button', { name: 'Profile' }).click();
    await urlField.fill('');
    await dialog.getByRole('button', { name: 'Save' }).click();
    await H.getByText('Your profile was saved.').waitFor(WAIT);
    await H.locator('#me-avatar:not([data-avatar])', { hasText: 'HM' }).waitFor(WAIT);
    assert.equal(await H.locator('#me-avatar img').count(), 0);

    await hana.context.close();
    await ian.context.close();
    assertNoPageErrors();
  });
});

/** The operator's webhook receiver for password reset notices, on the port that
 *  check-web.sh configured the gateways with. It keeps every notice it gets. */
class ResetInbox {
  constructor() {
    this.port = Number(env('WEB_RESET_WEBHOOK_PORT'));
    this.notices = [];
    this.server = null;
  }

  async start() {
    this.server = http.createServer((req, res) => {
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        try {
          this.notices.push({ path: req.url, contentType: req.headers['content-type'], ...JSON.parse(Buffer.concat(chunks).toString('utf8')) });
          res.writeHead(204);
        } catch {
          res.writeHead(400);
        }
        res.end();
      });
    });
    await new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.port, '127.0.0.1', resolve);
    });
  }

  async stop() {
    if (!this.server) return;
    this.server.closeAllConnections();
    await new Promise((r) => this.server.close(r));
  }

  /** The newest notice for `address`, waiting for it when none has come yet. */
  async waitFor(address, { after = 0, timeout = 15000 } = {}) {
    const deadline = Date.now() + timeout;
    for (;;) {
      const found = this.notices.slice(after).filter((n) => n.email === address).at(-1);
      if (found) return found;
      if (Date.now() > deadline) throw new Error(`no password reset notice for ${address}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

describe('password reset', () => {
  const inbox = new ResetInbox();
  before(() => inbox.start());
  after(() => inbox.stop());

  test('forgot password, the link from the webhook, a new password, log in; the old session is logged out (4101)', async () => {
    const jo = { name: `Jo ${RUN}` };
    const NEW_PASSWORD = 'a brand new staple battery';
    const nobody = `nobody-${RUN}@example.com`;

    // Jo's old session: registered and connected on node B, in one browser.
    const oldBrowser = await newBrowser();
    const O = await openPage(oldBrowser, GW_B, 'jo-old');
    await register(O, jo.name, { remember: true });
    await connected(O, NODE_B);

    // In another browser, on node A, Jo has forgotten the password.
    const newBrowserContext = await newBrowser();
    const P = await openPage(newBrowserContext, GW_A, 'jo-new');
    await P.getByRole('link', { name: 'Forgot password?' }).click();
    const forgot = P.locator('#forgot-form');
    await forgot.getByRole('button', { name: 'Send reset link' }).click();
    await forgot.getByText('Please enter your email.').waitFor(WAIT);
    await forgot.getByLabel('Email').fill('jo.example.com');
    await forgot.getByRole('button', { name: 'Send reset link' }).click();
    await forgot.getByText('Please enter a valid email address').waitFor(WAIT);
    // An email without an account gets the same answer (and no notice is sent).
    await forgot.getByLabel('Email').fill(nobody);
    await forgot.getByRole('button', { name: 'Send reset link' }).click();
    await P.getByText(`If an account exists for ${nobody}, we sent a link to reset its password to that address.`).waitFor(WAIT);
    await P.getByRole('button', { name: 'Send another link' }).click();
    await forgot.getByLabel('Email').fill(email(jo.name));
    await forgot.getByRole('button', { name: 'Send reset link' }).click();
    await P.getByText(`If an account exists for ${email(jo.name)}, we sent a link to reset its password to that address.`).waitFor(WAIT);
    await shot(P, 'forgot-password-sent');

    const notice = await inbox.waitFor(email(jo.name));
    assert.equal(notice.type, 'password_reset');
    assert.equal(notice.path, '/password-reset');
    assert.match(notice.contentType, /^application\/json/);
    assert.equal(notice.name, jo.name);
    assert.match(notice.token, /^[0-9a-f]{64}$/);
    assert.ok(notice.expires_at > Date.now() / 1000);
    assert.equal(inbox.notices.filter((n) => n.email === nobody).length, 0, 'no notice for an email without an account');

    // The link the receiver mails (docs/web-client.md): the page, with #reset_token=<token>.
    // Opened in the same tab, it is a fragment change (hashchange).
    const link = `${await pageOrigin(GW_A)}/#reset_token=${notice.token}`;
    await P.goto(link);
    await P.getByRole('heading', { name: 'Choose a new password' }).waitFor(WAIT);
    assert.ok(!P.url().includes(notice.token), `the token stays in the address bar: ${P.url()}`);
    assert.match(P.url(), /\/#reset$/);
    const reset = P.locator('#reset-form');
    await reset.getByLabel('New password', { exact: true }).fill('short');
    await reset.getByLabel('Confirm new password').fill('short');
    await reset.getByRole('button', { name: 'Change password' }).click();
    await reset.getByText('Use at least 8 characters.').waitFor(WAIT);
    await reset.getByLabel('New password', { exact: true }).fill(NEW_PASSWORD);
    await reset.getByLabel('Confirm new password').fill(`${NEW_PASSWORD}!`);
    await reset.getByRole('button', { name: 'Change password' }).click();
    await reset.getByText('The two passwords do not match.').waitFor(WAIT);
    await shot(P, 'reset-errors');
    await reset.getByLabel('Confirm new password').fill(NEW_PASSWORD);
    await reset.getByRole('button', { name: 'Change password' }).click();
    await P.getByText('Your password has been changed. Log in with your new password.').waitFor(WAIT);
    await P.getByRole('heading', { name: 'Log in' }).waitFor(WAIT);
    await shot(P, 'reset-done');

    // The old session's connection is closed with 4101: the login page, saying why.
    await O.getByText('Your password was changed, so you were logged out here. Please log in with your new password.').waitFor({ timeout: 20000 });
    await O.getByRole('heading', { name: 'Log in' }).waitFor(WAIT);
    assert.equal(await O.evaluate(() => localStorage.getItem('chat.session')), null);
    await shot(O, 'reset-old-session-logged-out');

    // The old password no longer works; the new one does.
    const loginForm = P.locator('#login-form');
    await loginForm.getByLabel('Email', { exact: true }).fill(email(jo.name));
    await loginForm.getByLabel('Password', { exact: true }).fill(PASSWORD);
    await loginForm.getByRole('button', { name: 'Log in' }).click();
    await P.getByText('That email and password do not match an account.').waitFor(WAIT);
    await loginForm.getByLabel('Password', { exact: true }).fill(NEW_PASSWORD);
    await loginForm.getByRole('button', { name: 'Log in' }).click();
    await connected(P, NODE_A);
    await P.locator('#me-name', { hasText: jo.name }).waitFor(WAIT);

    // The same link again, loaded afresh in a new tab: spent, so refused, with a way to a new one.
    const again = await newBrowserContext.newPage();
    again.on('pageerror', (err) => pageErrors.push(`jo-again: ${err.message}`));
    await again.goto(link);
    await again.getByRole('heading', { name: 'Choose a new password' }).waitFor(WAIT);
    assert.ok(!again.url().includes(notice.token));
    await again.getByLabel('New password', { exact: true }).fill('yet another password');
    await again.getByLabel('Confirm new password').fill('yet another password');
    await again.getByRole('button', { name: 'Change password' }).click();
    await again.getByText('This reset link has expired or was already used.').waitFor(WAIT);
    assert.equal(await again.locator('#reset-form').isVisible(), false);
    await shot(again, 'reset-link-used');
    await again.getByRole('link', { name: 'Request a new link' }).click();
    await again.getByRole('heading', { name: 'Forgot password' }).waitFor(WAIT);

    await oldBrowser.close();
    await newBrowserContext.close();
    assertNoPageErrors();
  });
});

describe('session end', () => {
  test('a token that expires during the session (close 4100) brings back the login form', async () => {
    const res = await fetch(`${GW_A}/api/v1/auth/register`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ name: `Erin ${RUN}`, email: email(`Erin ${RUN}`), password: PASSWORD }),
    });
    assert.equal(res.status, 201);
    const { user } = await res.json();
    // The same kind of token the gateway issues (HS256 with the stack's secret), expiring soon.
    const now = Math.floor(Date.now() / 1000);
    const part = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
    const unsigned = `${part({ typ: 'JWT', alg: 'HS256' })}.${part({ sub: user.id, iat: now, exp: now + 4 })}`;
    const token = `${unsigned}.${createHmac('sha256', env('CHAT_JWT_SECRET')).update(unsigned).digest('base64url')}`;

    const context = await newBrowser();
    await context.addInitScript(([session]) => {
      if (!sessionStorage.getItem('seeded')) {
        sessionStorage.setItem('seeded', '1');
        localStorage.setItem('chat.session', session);
      }
    }, [JSON.stringify({ token, user })]);
    const page = await openPage(context, GW_A, 'erin');
    await connected(page, NODE_A);
    await page.getByText('Your session has expired. Please log in again.').waitFor({ timeout: 20000 });
    await page.getByRole('heading', { name: 'Log in' }).waitFor(WAIT);
    assert.equal(await page.evaluate(() => localStorage.getItem('chat.session')), null);
    await shot(page, 'session-expired');
    await context.close();
    assertNoPageErrors();
  });
});

/** Whether a child process is still running (one ended by a signal has signalCode, not exitCode). */
const running = (proc) => proc !== null && proc.exitCode === null && proc.signalCode === null;

/** A gateway node the test owns, so that it can stop it and start it again on the same port. */
class RestartableGateway {
  /** `settings`: environment the node gets beyond the stack's (CHAT_* overrides). */
  constructor({ nodeId = 'web-restart', settings = {} } = {}) {
    this.bin = env('WEB_GATEWAY_BIN');
    this.port = env('WEB_RESTART_PORT');
    this.admin = env('WEB_RESTART_ADMIN_PORT');
    this.settings = settings;
    this.nodeId = nodeId;
    this.url = `http://127.0.0.1:${this.port}`;
    this.proc = null;
    this.all = new Set(); // every process started, so that none outlives the tests
    this.starts = 0;
  }

  async ready() {
    try {
      return (await fetch(`http://127.0.0.1:${this.admin}/readyz`)).ok;
    } catch {
      return false;
    }
  }

  async start() {
    if (running(this.proc)) throw new Error('the node is running already');
    // Readiness below must come from this process, not from one left on the port.
    if (await this.ready()) throw new Error(`something already answers on 127.0.0.1:${this.admin}`);
    this.starts += 1;
    const log = openSync(new URL(`gateway-${this.nodeId}-${this.starts}.log`, ARTIFACTS), 'w');
    const proc = spawn(this.bin, [], {
      env: {
        ...process.env,
        CHAT_GATEWAY_NODE_ID: this.nodeId,
        CHAT_GATEWAY_LISTEN: `127.0.0.1:${this.port}`,
        CHAT_GATEWAY_INTERNAL_LISTEN: `127.0.0.1:${this.admin}`,
        ...this.settings,
      },
      stdio: ['ignore', log, log],
    });
    this.proc = proc;
    this.all.add(proc);
    proc.once('exit', () => this.all.delete(proc));
    if (process.env.WEB_RESTART_PID_FILE) appendFileSync(process.env.WEB_RESTART_PID_FILE, `${proc.pid}\n`);
    const deadline = Date.now() + 30000;
    while (Date.now() < deadline) {
      if (!running(proc)) throw new Error(`the gateway exited (${proc.exitCode ?? proc.signalCode}); see gateway-${this.nodeId}-${this.starts}.log`);
      if (await this.ready()) return;
      await new Promise((r) => setTimeout(r, 200));
    }
    throw new Error('the restarted gateway never became ready');
  }

  /** Stops the node: SIGKILL drops its connections without a close frame; SIGTERM drains it,
   *  closing them with 1001 (going_away) before it exits. */
  async stop(signal = 'SIGKILL') {
    const proc = this.proc;
    if (!running(proc)) return;
    const exited = new Promise((r) => proc.once('exit', r));
    proc.kill(signal);
    await exited;
  }

  /** Kills every process this object started. */
  async stopAll() {
    await Promise.all([...this.all].map((proc) => {
      const exited = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGKILL');
      return exited;
    }));
  }
}

// Runs before the reconnect tests, on the same spare ports, stopping its node when done.
describe('people in contacts mode', () => {
  const node = new RestartableGateway({ nodeId: 'web-contacts', settings: { CHAT_PRESENCE_VISIBILITY: 'contacts' } });
  after(() => node.stopAll());

  /** Clicks Refresh until `locator` shows (the worker writes a new direct conversation to
   *  Postgres a moment after its first message, and the contacts list comes from there). */
  async function refreshUntil(page, locator) {
    const deadline = Date.now() + 15000;
    for (;;) {
      await page.getByRole('button', { name: 'Refresh' }).click();
      try {
        await locator.waitFor({ timeout: 1000 });
        return;
      } catch (err) {
        if (Date.now() > deadline) throw err;
      }
    }
  }

  test('the People view lists contacts only, finds others by email, and shows presence once they talk', async () => {
    await node.start();
    const kim = { name: `Kim ${RUN}` };
    const lou = { name: `Lou ${RUN}` };
    kim.context = await newBrowser();
    lou.context = await newBrowser();
    const K = (kim.page = await openPage(kim.context, node.url, 'kim'));
    const L = (lou.page = await openPage(lou.context, node.url, 'lou'));
    await register(L, lou.name);
    await connected(L, node.nodeId);
    await register(K, kim.name);
    await connected(K, node.nodeId);

    // Strangers are not listed, not even by name; the page says how to find them.
    await showPeople(K);
    await K.getByText('No contacts yet.').waitFor(WAIT);
    await K.getByText('People you share a conversation with.').waitFor(WAIT);
    const search = K.getByLabel('Search people by name, or find someone by email');
    await search.fill(lou.name);
    await K.getByText('None of your contacts has that name.').waitFor(WAIT);
    assert.equal(await person(K, lou.name).count(), 0);
    // By email: found, without presence.
    await search.fill(email(lou.name));
    await person(K, lou.name).waitFor(WAIT);
    assert.equal((await person(K, lou.name).locator('.presence').textContent()).trim(), '');
    await shot(K, 'people-contacts-found-by-email');

    // They talk: now each is the other's contact, online.
    await person(K, lou.name).click();
    await send(K, 'Hello Lou');
    await showChats(L);
    await conversation(L, kim.name).click();
    await waitForMessage(L, 'Hello Lou');
    await showPeople(L);
    await refreshUntil(L, person(L, kim.name).locator('.presence', { hasText: 'Online' }));
    await search.fill('');
    await showPeople(K);
    await refreshUntil(K, person(K, lou.name).locator('.presence', { hasText: 'Online' }));
    await shot(K, 'people-contacts');
    // And goes offline, live.
    await L.getByRole('button', { name: 'Log out' }).click();
    await person(K, lou.name).locator('.presence', { hasText: 'Offline' }).waitFor(WAIT);
    await kim.context.close();
    await lou.context.close();
    await node.stopAll();
    assertNoPageErrors();
  });
});

describe('reconnect', () => {
  const node = new RestartableGateway();
  after(() => node.stopAll());

  test('the page recovers every message sent while its gateway node was down (crash: SIGKILL)', async () => {
    await node.start();
    const carol = { name: `Carol ${RUN}` };
    const dave = { name: `Dave ${RUN}` };
    carol.context = await newBrowser();
    dave.context = await newBrowser();
    const C = (carol.page = await openPage(carol.context, GW_A, 'carol'));
    const D = (dave.page = await openPage(dave.context, node.url, 'dave'));
    await register(D, dave.name, { remember: true });
    await connected(D, node.nodeId);
    await register(C, carol.name);
    await showPeople(C);
    await person(C, dave.name).click();

    const total = 60; // more than one history page (50)
    const bodies = Array.from({ length: total }, (_, i) => `message ${String(i + 1).padStart(2, '0')}`);
    for (const body of bodies.slice(0, 10)) await send(C, body);
    await showChats(D);
    await conversation(D, carol.name).click();
    await waitForMessage(D, 'message 10');

    // Dave's node dies mid-conversation; Carol keeps writing.
    await node.stop('SIGKILL');
    await D.locator('#conn[data-state="reconnecting"]').waitFor(WAIT);
    await D.getByText('Connection lost.').waitFor(WAIT);
    await shot(D, 'reconnect-down');
    for (const body of bodies.slice(10, 40)) await send(C, body);

    // The node comes back on the same port; the page reconnects by itself and syncs.
    await node.start();
    for (const body of bodies.slice(40, 50)) await send(C, body);
    await connected(D, node.nodeId);
    for (const body of bodies.slice(50)) await send(C, body);
    await waitForMessage(D, bodies[total - 1]);
    const shown = await shownMessages(D);
    assert.deepEqual(shown.map((m) => m.seq), bodies.map((_, i) => i + 1), 'no gaps, no duplicates, in order');
    assert.deepEqual(shown.map((m) => m.body), bodies);
    await shot(D, 'reconnect-recovered');

    // And the conversation goes on both ways.
    await send(D, 'back again');
    await waitForMessage(C, 'back again');

    // A reload shows the newest page; paging upward brings back the rest, without duplicates.
    await D.reload();
    await connected(D, node.nodeId);
    await conversation(D, carol.name).click();
    await waitForMessage(D, 'back again');
    assert.equal((await shownMessages(D)).length, 50);
    await D.getByRole('button', { name: 'Load older messages' }).click();
    await D.getByText('This is the start of the conversation.').waitFor(WAIT);
    const all = await shownMessages(D);
    assert.deepEqual(all.map((m) => m.seq), Array.from({ length: total + 1 }, (_, i) => i + 1));
    assert.deepEqual(all.map((m) => m.body), [...bodies, 'back again']);

    await carol.context.close();
    await dave.context.close();
    await node.stop();
    assertNoPageErrors();
  });
  test('the page recovers every message sent while its node drained and restarted (SIGTERM: close 1001)', async () => {
    await node.start();
    const frank = { name: `Frank ${RUN}` };
    const grace = { name: `Grace ${RUN}` };
    frank.context = await newBrowser();
    grace.context = await newBrowser();
    const F = (frank.page = await openPage(frank.context, GW_B, 'frank'));
    const G = (grace.page = await openPage(grace.context, node.url, 'grace'));
    await register(G, grace.name);
    await connected(G, node.nodeId);
    await register(F, frank.name);
    await showPeople(F);
    await person(F, grace.name).click();
    const bodies = Array.from({ length: 20 }, (_, i) => `drain ${String(i + 1).padStart(2, '0')}`);
    for (const body of bodies.slice(0, 5)) await send(F, body);
    await showChats(G);
    await conversation(G, frank.name).click();
    await waitForMessage(G, 'drain 05');

    await node.stop('SIGTERM');
    await G.locator('#conn[data-state="reconnecting"]').waitFor(WAIT);
    for (const body of bodies.slice(5, 15)) await send(F, body);
    await node.start();
    await connected(G, node.nodeId);
    for (const body of bodies.slice(15)) await send(F, body);
    await waitForMessage(G, 'drain 20');
    const shown = await shownMessages(G);
    assert.deepEqual(shown.map((m) => m.seq), bodies.map((_, i) => i + 1), 'no gaps, no duplicates, in order');
    assert.deepEqual(shown.map((m) => m.body), bodies);
    await send(G, 'drained and back');
    await waitForMessage(F, 'drained and back');
    await frank.context.close();
    await grace.context.close();
    await node.stop();
    assertNoPageErrors();
  });
});
