// Drives the dashboard in headless Chromium (Debian's, through playwright-core): the paused
// subscription's backlog shows, resuming it by a click lets its lag drop to 0, a dead letter
// is redriven by a click, an undecided transaction is committed by a click; the answering node
// (WASMQ_NODE_ID) is named and listed up. As a console: a topic is created, messages are
// browsed by queue and by key (a text body shown as text), a dead-lettered one traced, a
// subscription is created and one
// opened for editing, offsets are reset to a time picked, a plugin (WASMQ_PROBE) is uploaded
// and a plugin's log is read.
// Usage: node e2e.mjs URL  (WASMQ_NODE_MODULES: where playwright-core is installed)
import { createRequire } from "node:module";

const require = createRequire(process.env.WASMQ_NODE_MODULES.replace(/\/?$/, "/"));
const { chromium } = require("playwright-core");

const url = process.argv[2];
const browser = await chromium.launch({
  executablePath: process.env.WASMQ_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const step = (s) => console.log(`step: ${s}`);

async function expectText(locator, want, timeout = 15000) {
  const until = Date.now() + timeout;
  let got;
  while (Date.now() < until) {
    got = (await locator.first().textContent({ timeout: 1000 }).catch(() => null))?.trim();
    if (got === want) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`expected ${want}, saw ${got}`);
}

try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(url);
  await page.waitForSelector('body[data-ready="true"]', { timeout: 15000 });
  step("dashboard loaded");
  await expectText(page.locator("#node"), `node ${process.env.WASMQ_NODE_ID} · rocksdb`);
  await expectText(page.locator(`#nodes tr[data-node="${process.env.WASMQ_NODE_ID}"] td:nth-child(3)`), "up");
  step("the answering node shown");

  const lag = page.locator('tr[data-sub="slow"] td.lag');
  await expectText(lag, "50");
  await expectText(page.locator('tr[data-topic="orders"] td:nth-child(3)'), "50");
  step("backlog of the paused subscription shown");
  await page.locator('tr[data-sub="slow"] button[data-action="resume"]').click();
  await expectText(lag, "0", 30000);
  step("lag dropped to 0 after resume");

  await page.selectOption("#dlq-group", "rejects");
  await page.locator("#dlq tr[data-dead]").first().waitFor({ timeout: 15000 });
  await page.locator('#dlq tr[data-dead] button[data-action="redrive"]').first().click();
  step("dead letter redriven");

  await page.locator('#txns tr[data-txn] button[data-action="commit"]').first().click();
  await page.locator("#txns tr[data-txn]").first().waitFor({ state: "detached", timeout: 15000 });
  step("transaction committed");

  await page.fill("#topic-name", "made-here");
  await page.fill("#topic-queues", "2");
  await page.click('#topic-form button[type="submit"]');
  await expectText(page.locator('tr[data-topic="made-here"] td:nth-child(2)'), "2");
  step("topic created");

  await page.selectOption("#browse-topic", "notes");
  await page.click('#browse-form button[type="submit"]');
  await expectText(page.locator("#messages tr[data-message] td.body").first(), '{"note":1}');
  await page.fill("#browse-key", "note-2");
  await page.click('#browse-form button[type="submit"]');
  await expectText(page.locator("#messages tr[data-message] td.body"), "hello text");
  step("messages browsed");

  // The rejected message's trace: dead-lettered, after one attempt the plugin rejected. Trace
  // records are written in batches: asked again until they are there.
  await page.fill("#browse-key", "");
  await page.selectOption("#browse-topic", "bad");
  await page.click('#browse-form button[type="submit"]');
  await expectText(page.locator("#messages tr[data-message] td.body"), '"no"');
  for (let i = 0; ; i++) {
    await page.click('#messages tr[data-message] button[data-action="trace"]');
    const seen = await page.locator('#trace-now tr[data-state="dead_lettered"]').count();
    if (seen > 0) break;
    if (i > 50) throw new Error("the trace never showed the message dead-lettered");
    await new Promise((r) => setTimeout(r, 200));
  }
  await expectText(page.locator('#trace tr[data-outcome="reject"] td').nth(6), "reject");
  step("message traced");

  await page.fill("#sub-group", "made-sub");
  await page.fill("#sub-spec", JSON.stringify({ topic: "made-here", plugin: "recorder", config: { audit: "audit" }, grants: { publish: ["audit"] } }));
  await page.click('#sub-form button[type="submit"]');
  await page.locator('tr[data-sub="made-sub"]').waitFor({ timeout: 15000 });
  step("subscription created");
  await page.locator('tr[data-sub="slow"] button[data-action="edit"]').click();
  const spec = JSON.parse(await page.inputValue("#sub-spec"));
  if (spec.topic !== "orders" || (await page.inputValue("#sub-group")) !== "slow") throw new Error(`edit shows ${JSON.stringify(spec)}`);
  step("subscription opened for editing");

  await page.selectOption("#reset-group", "slow");
  await page.fill("#reset-at", "2000-01-01T00:00:00");
  await page.click('#reset-form button[type="submit"]');
  await expectText(page.locator("#reset-form output"), "done");
  step("offsets reset to a time");

  await page.fill("#upload-name", "uploaded");
  await page.setInputFiles("#upload-file", process.env.WASMQ_PROBE);
  await page.click('#upload-form button[type="submit"]');
  await expectText(page.locator('tr[data-plugin="uploaded"] td:nth-child(2)'), "v1");
  step("plugin uploaded");

  await page.locator('tr[data-plugin="probe"] button[data-action="logs"]').click();
  await expectText(page.locator("#logs tr[data-line] td:nth-child(5)").first(), "from the console test");
  step("plugin log read");

  if (process.env.WASMQ_SCREENSHOT) await page.screenshot({ path: process.env.WASMQ_SCREENSHOT, fullPage: true });
  if (errors.length) throw new Error(`page errors: ${errors.join("; ")}`);
  console.log("ok");
} catch (e) {
  console.error(`FAILED: ${e.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
