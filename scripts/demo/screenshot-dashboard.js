// Renders the README's dashboard picture (docs/dashboard.png): logs in on keycast's login
// page with Chromium (playwright-core) and saves the dashboard. Run it after
// scripts/walkthrough.sh, with the address and password that script printed:
//
//   NODE_PATH=$KEYCAST_PLAYWRIGHT_DIR/node_modules \
//     node scripts/demo/screenshot-dashboard.js http://localhost:3000 EMAIL PASSWORD docs/dashboard.png
//
// CHROMIUM names the browser binary (default /usr/bin/chromium).
const { chromium } = require('playwright-core');

const [base, email, password, out] = process.argv.slice(2);

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1000, height: 700 } });
    page.setDefaultTimeout(20000);
    await page.goto(`${base}/login`);
    await page.fill('input[name=email]', email);
    await page.fill('input[name=password]', password);
    await Promise.all([page.waitForURL('**/dashboard'), page.click('button[type=submit]')]);
    await page.screenshot({ path: out, fullPage: true });
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
