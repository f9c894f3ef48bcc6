// Logs in to keycast in Debian's Chromium (through playwright-core), then opens the link an
// app builds from NIP-46 discovery's `nostrconnect_url` (the app's nostrconnect:// URI in the
// fragment), as a person who followed it would. Prints one JSON line: every request the
// browser sent (URL and `Referer`), the page the link led to, and what its form holds.
//
//   node drive.js BASE_URL EMAIL PASSWORD LINK PROFILE_DIR
//
// The browser: ../chromium.js.
const { launch } = require('../chromium.js');

const [base, email, password, link, profile] = process.argv.slice(2);

async function main() {
  const context = await launch(profile);
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(20000);
    await page.goto(`${base}/login`);
    await page.fill('input[name=email]', email);
    await page.fill('input[name=password]', password);
    await Promise.all([page.waitForURL('**/dashboard'), page.click('button[type=submit]')]);
    // Followed from the app's page, not typed over the open dashboard: a load of its own.
    await page.goto('about:blank');
    const sent = [];
    page.on('request', (request) => {
      sent.push({ url: request.url(), referer: request.headers()['referer'] || null });
    });
    await Promise.all([page.waitForURL('**/dashboard/nostrconnect/review'), page.goto(link)]);
    await page.waitForSelector('text=App key');
    const uri = await page.inputValue('form[action="/dashboard/nostrconnect"] input[name=uri]');
    const chosen = await page.inputValue('form[action="/dashboard/nostrconnect"] select[name=policy]');
    console.log(JSON.stringify({ sent, reached: page.url(), uri, chosen }));
  } finally {
    await context.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
