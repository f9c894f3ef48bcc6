// Launches Debian's Chromium through playwright-core for the drivers beside this file
// (`<test>/drive.js`), with a persistent profile in PROFILE_DIR. CHROMIUM names the browser
// binary (default /usr/bin/chromium). The flags are the ones this kind of machine needs (no
// sandbox as root, no GPU, no background connections to Google).
const { chromium } = require('playwright-core');

exports.launch = (profile, options = {}) =>
  chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    ...options,
  });
