// A hostile web page, served from another site than keycast, opened in Debian's Chromium
// (through playwright-core): what a visitor's browser does when a page elsewhere attacks
// keycast. Prints one JSON line with what happened.
//
//   node drive.js MODE KEYCAST_BASE PROFILE_DIR [ARGS…]
//
// Modes:
//   login-csrf EMAIL PASSWORD  the page posts the attacker's credentials to keycast, once as a
//                              text/plain form carrying JSON (POST /api/auth/login) and once
//                              as the OAuth login form (POST /api/oauth/login); then the
//                              visitor opens keycast: is their browser logged in?
//   framing PATH               the page frames keycast's PATH: does it render inside?
//   view-gate PATH COOKIE      the visitor (session cookie NAME=VALUE) has keycast's consent
//                              page at PATH in front of them: is "Approve" held back at first,
//                              and again right after the window lost and regained focus (what
//                              a double-clickjacking page makes happen between two clicks)?
//
// keycast is reached at KEYCAST_BASE (http://127.0.0.1:PORT); the hostile page is served by
// this script at http://localhost:PORT2 — another site for the browser.
const http = require('http');
const { chromium } = require('playwright-core');

const [mode, base, profile, ...rest] = process.argv.slice(2);

function serve(html) {
  return new Promise((resolve) => {
    const server = http.createServer((req, res) => {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(html);
    });
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}

const esc = (s) => s.replace(/&/g, '&amp;').replace(/'/g, '&#39;').replace(/"/g, '&quot;').replace(/</g, '&lt;');

function loginCsrfPage(email, password) {
  // A text/plain form whose one field's name and value join into a JSON document.
  const name = `{"email":"${email}","password":"${password}","pad":"`;
  return `<!doctype html><html><body>
<form id="json" method="post" action="${base}/api/auth/login" enctype="text/plain">
<input type="hidden" name='${esc(name)}' value='"}'></form>
<form id="oauth" method="post" action="${base}/api/oauth/login">
<input type="hidden" name="email" value="${esc(email)}">
<input type="hidden" name="password" value="${esc(password)}">
<input type="hidden" name="client_id" value="app"><input type="hidden" name="redirect_uri" value="http://127.0.0.1:9/cb">
<input type="hidden" name="scope" value="policy:full"><input type="hidden" name="code_challenge" value="x">
<input type="hidden" name="code_challenge_method" value="S256"></form>
<script>document.getElementById(location.hash === '#oauth' ? 'oauth' : 'json').submit();</script>
</body></html>`;
}

function framingPage(path) {
  return `<!doctype html><html><body><h1>Win a prize</h1>
<iframe id="victim" src="${base}${path}" width="800" height="600"></iframe></body></html>`;
}

async function main() {
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  let server;
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(20000);
    if (mode === 'login-csrf') {
      const [email, password] = rest;
      server = await serve(loginCsrfPage(email, password));
      const hostile = `http://localhost:${server.address().port}/`;
      const answers = [];
      for (const which of ['json', 'oauth']) {
        const response = await Promise.all([
          page.waitForResponse((r) => r.url().startsWith(base) && r.request().method() === 'POST'),
          page.goto(`${hostile}#${which}`),
        ]).then(([r]) => r);
        answers.push({ form: which, status: response.status() });
        await page.waitForLoadState();
      }
      const key = await page.goto(`${base}/api/user/key`);
      const cookies = (await context.cookies(base)).map((c) => c.name);
      console.log(JSON.stringify({ answers, key_status: key.status(), key_body: await key.text(), cookies }));
    } else if (mode === 'framing') {
      const [path] = rest;
      server = await serve(framingPage(path));
      const hostile = `http://localhost:${server.address().port}/`;
      const framed = page.waitForResponse((r) => r.url().startsWith(base));
      await page.goto(hostile);
      const response = await framed;
      await page.waitForLoadState('load');
      const frame = page.frames().find((f) => f !== page.mainFrame());
      let rendered = false;
      let text = '';
      try {
        text = await frame.evaluate(() => document.body ? document.body.innerText : '');
        rendered = frame.url().startsWith(base) && text.length > 0;
      } catch (err) {
        text = String(err);
      }
      console.log(JSON.stringify({ status: response.status(), frame_url: frame.url(), rendered, text: text.slice(0, 200) }));
    } else if (mode === 'view-gate') {
      const [path, cookie] = rest;
      const [name, value] = cookie.split(/=(.*)/s);
      await context.addCookies([{ name, value, url: base }]);
      const posts = [];
      page.on('request', (r) => { if (r.method() === 'POST') posts.push(r.url()); });
      // The button's state as the document finishes parsing (its script has run): read in
      // the page, so a slow machine between load and the next step cannot blur it.
      await page.addInitScript(() => {
        document.addEventListener('DOMContentLoaded', () => {
          const button = document.querySelector('button[value=approve]');
          window.__approveDisabledAtLoad = button ? button.disabled : null;
        });
      });
      await page.goto(`${base}${path}`);
      const approve = page.locator('button[value=approve]');
      await approve.scrollIntoViewIfNeeded();
      const box = await approve.boundingBox();
      const [x, y] = [box.x + box.width / 2, box.y + box.height / 2];
      const disabledAtLoad = await page.evaluate(() => window.__approveDisabledAtLoad);
      // However long loading took, the window has just come to the front.
      await page.evaluate(() => {
        window.dispatchEvent(new Event('blur'));
        window.dispatchEvent(new Event('focus'));
      });
      await page.mouse.click(x, y);
      await page.waitForTimeout(300);
      const postsAtOnce = posts.length;
      await page.waitForTimeout(1000);
      const enabledAfterView = await approve.isEnabled();
      // Another window in front, then gone: the second click of a double click follows.
      await page.evaluate(() => {
        window.dispatchEvent(new Event('blur'));
        window.dispatchEvent(new Event('focus'));
      });
      const disabledAfterRefocus = await approve.isDisabled();
      await page.mouse.click(x, y);
      await page.waitForTimeout(300);
      const postsAfterRefocus = posts.length;
      await page.waitForTimeout(1000);
      const enabledAfterRefocusWait = await approve.isEnabled();
      await page.mouse.click(x, y);
      await page.waitForTimeout(500);
      console.log(JSON.stringify({
        disabledAtLoad, postsAtOnce, enabledAfterView, disabledAfterRefocus, postsAfterRefocus,
        enabledAfterRefocusWait, postsAfterWait: posts.length,
      }));
    } else {
      throw new Error(`unknown mode ${mode}`);
    }
  } finally {
    if (server) server.close();
    await context.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
