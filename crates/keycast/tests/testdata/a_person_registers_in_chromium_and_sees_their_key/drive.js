// Drives Debian's Chromium (through playwright-core) the way a person would: open keycast's
// register page, fill in the form, submit, land on the dashboard. Prints one JSON line with
// what the dashboard shows and saves a screenshot of it.
//
//   node drive.js BASE_URL EMAIL PASSWORD SCREENSHOT.png PROFILE_DIR
//
// The browser: ../chromium.js.
const { launch } = require('../chromium.js');

const [base, email, password, screenshot, profile] = process.argv.slice(2);

async function main() {
  const context = await launch(profile, { viewport: { width: 1000, height: 700 } });
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(20000);
    await page.goto(`${base}/register`);
    await page.fill('input[name=email]', email);
    await page.fill('input[name=password]', password);
    await Promise.all([page.waitForURL('**/dashboard'), page.click('button[type=submit]')]);
    const npub = (await page.textContent('code.npub')).trim();
    const hex = (await page.locator('dt:text-is("Public key (hex)") + dd code').textContent()).trim();
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(JSON.stringify({ url: page.url(), title: await page.title(), npub, hex }));
  } finally {
    await context.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
