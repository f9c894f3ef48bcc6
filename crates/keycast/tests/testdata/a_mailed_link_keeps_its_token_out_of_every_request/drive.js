// Opens a mailed link (a password reset's, an address confirmation's) in Debian's Chromium
// (through playwright-core), types the password it asks for and submits, as a person would. Prints one JSON line: every request the browser
// sent (its URL and `Referer`), the address bar after the page's script ran, and the page
// reached.
//
//   node drive.js LINK PASSWORD PROFILE_DIR
//
// The browser: ../chromium.js.
const { launch } = require('../chromium.js');

const [link, password, profile] = process.argv.slice(2);

async function main() {
  const context = await launch(profile);
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(20000);
    const sent = [];
    page.on('request', (request) => {
      sent.push({ url: request.url(), referer: request.headers()['referer'] || null });
    });
    await page.goto(link);
    const address = page.url();
    const codeFieldVisible = await page.isVisible('input[name=token]');
    await page.fill('input[name=password]', password);
    await Promise.all([page.waitForLoadState('load'), page.click('button[type=submit]')]);
    await page.waitForSelector('h1');
    const heading = (await page.textContent('h1')).trim();
    console.log(JSON.stringify({ sent, address, codeFieldVisible, heading }));
  } finally {
    await context.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
