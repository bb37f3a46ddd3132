// The demo page (src/api/demo.html) in a real browser: Debian's chromium driven by
// playwright-core. Run it through ./run.sh, which starts a dmpay server in development
// mode and sets DEMO_URL; by hand:
//
//   DEMO_URL=http://127.0.0.1:50081/demo node tests/browser/demo.test.mjs
//
// The story: alice sends bob 12.50 with one tap; bob requests 7.25 and alice pays it
// with one tap; both threads follow it live, and the balances add up.
//
// Environment:
//   DEMO_URL        the page (required)
//   CHROMIUM        the browser (default /usr/bin/chromium)
//   SCREENSHOT      where to save the final screenshot (default target/browser/demo.png)
//   STEP_TIMEOUT_MS how long each step may take (default 15000)

import { mkdirSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const DEMO_URL = process.env.DEMO_URL;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SCREENSHOT = resolve(ROOT, process.env.SCREENSHOT || "target/browser/demo.png");
const FAILURE_SCREENSHOT = SCREENSHOT.replace(/\.png$/, "-failure.png");
const TIMEOUT = Number(process.env.STEP_TIMEOUT_MS || 15000);

if (!DEMO_URL) {
  console.error("DEMO_URL is not set; run tests/browser/run.sh");
  process.exit(2);
}

const tid = (id) => `[data-testid="${id}"]`;

/** Runs one step of the story, printing it; a failure names the step. */
async function step(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
  } catch (err) {
    throw new Error(`step "${name}" failed: ${err.message.split("\n")[0]}`);
  }
  console.log(`ok   ${name} (${Date.now() - t0} ms)`);
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ["--no-sandbox"], // CI runs as root
});
const page = await browser.newPage({ viewport: { width: 1100, height: 720 } });
page.setDefaultTimeout(TIMEOUT);
const consoleErrors = [];
page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
page.on("pageerror", (e) => consoleErrors.push(String(e)));

const thread = (role) => page.locator(tid(`thread-${role}`));
/** The bubbles of one kind in a thread whose text includes `amount`. */
const bubbles = (role, kind, amount) =>
  thread(role).locator(`${tid("bubble")}[data-kind="${kind}"]`).filter({ hasText: amount });

/** Waits until the bubble has the attribute value (the state the stream moved it to). */
async function waitForState(role, kind, amount, attr, want) {
  const bubble = bubbles(role, kind, amount).first();
  await bubble.waitFor();
  try {
    await page.waitForFunction(([el, a, w]) => el.getAttribute(a) === w, [await bubble.elementHandle(), attr, want], {
      timeout: TIMEOUT,
    });
  } catch {
    const got = await bubble.getAttribute(attr);
    throw new Error(`${role}'s ${kind} bubble of ${amount} is ${attr}=${got}, not ${want}`);
  }
}

async function waitForBalance(role, want) {
  const el = page.locator(tid(`balance-${role}`));
  try {
    await page.waitForFunction(([e, w]) => e.dataset.amount === w, [await el.elementHandle(), want], {
      timeout: TIMEOUT,
    });
  } catch {
    throw new Error(`${role}'s balance is ${await el.getAttribute("data-amount")}, not ${want}`);
  }
}

let failed = false;
try {
  await step(`open ${DEMO_URL}`, async () => {
    await page.goto(DEMO_URL);
    if ((await thread("alice").count()) === 0) {
      throw new Error(
        "the page has no demo threads: is the binary built with the current src/api/demo.html? " +
          "(rebuild it, or run with DEMO_WORKING_COPY=1)",
      );
    }
  });

  await step("both threads set up (tokens, accounts, funding, watch)", async () => {
    for (const role of ["alice", "bob"]) {
      await page.locator(`${tid(`thread-${role}`)}[data-ready="true"]`).waitFor();
    }
    await waitForBalance("alice", "100.00");
    await waitForBalance("bob", "20.00");
  });

  await step("alice sends bob 12.50 with one tap: settled in both threads", async () => {
    await page.fill(tid("send-amount-alice"), "12.50");
    await page.fill(tid("note-alice"), "lunch");
    await page.click(tid("send-alice"));
    await waitForState("alice", "payment", "12.50", "data-status", "settled");
    await waitForState("bob", "payment", "12.50", "data-status", "settled");
  });

  await step("bob requests 7.25: an open bill with a Pay button in alice's thread", async () => {
    await page.fill(tid("send-amount-bob"), "7.25");
    await page.fill(tid("note-bob"), "movie tickets");
    await page.click(tid("request-bob"));
    await waitForState("bob", "bill", "7.25", "data-status", "open");
    await waitForState("alice", "bill", "7.25", "data-status", "open");
    await bubbles("alice", "bill", "7.25").locator(tid("pay")).waitFor();
  });

  await step("alice taps Pay: the bill is paid and its payment settled in both threads", async () => {
    await bubbles("alice", "bill", "7.25").locator(tid("pay")).click();
    for (const role of ["alice", "bob"]) {
      await waitForState(role, "bill", "7.25", "data-status", "paid");
      await waitForState(role, "bill", "7.25", "data-payment-status", "settled");
    }
    if ((await bubbles("alice", "bill", "7.25").locator(tid("pay")).count()) !== 0) {
      throw new Error("the Pay button is still there");
    }
  });

  await step("balances: alice 80.25, bob 39.75", async () => {
    await waitForBalance("alice", "80.25");
    await waitForBalance("bob", "39.75");
  });

  await step("no errors shown in the threads", async () => {
    const errors = await page.locator('[data-testid^="error-"]').allTextContents();
    if (errors.length) throw new Error(errors.join("; "));
  });

  mkdirSync(dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  console.log(`PASS: the demo story ran in chromium; screenshot: ${SCREENSHOT}`);
} catch (err) {
  failed = true;
  console.error(`FAIL: ${err.message}`);
  const shown = await page.locator('[data-testid^="error-"]').allTextContents().catch(() => []);
  for (const e of shown) console.error(`  shown in a thread: ${e}`);
  for (const e of consoleErrors) console.error(`  browser console: ${e}`);
  try {
    mkdirSync(dirname(FAILURE_SCREENSHOT), { recursive: true });
    await page.screenshot({ path: FAILURE_SCREENSHOT, fullPage: true });
    console.error(`  screenshot: ${FAILURE_SCREENSHOT}`);
  } catch (e) {
    console.error(`  no screenshot: ${e.message}`);
  }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
